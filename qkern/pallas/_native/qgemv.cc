// qkern's native CPU kernels: y[M, N] = x[M, K] @ W[K, N] for small M with W quantised,
// called from XLA through the FFI (see __init__.py, which builds and registers this file).
//
// x86-64 with AVX2 and FMA. Codes are decoded in registers, eight at a time, and never
// written out: 4-bit codes go through a 16-entry table held in two registers
// (vpermps on the low three bits, a blend on the fourth), int8 codes are widened and
// converted. Per block of rows the products are summed unscaled, then scaled once per
// column. Zero points are left to the caller (a [M, nb] @ [nb, N] term).
//
// Storage (qkern/pallas/_operand.py): 4-bit codes are uint8 [R, N], byte row r holding
// logical row r in its low nibble and row r + R in its high nibble; int8 codes are [K, N].
// scales are [nb, N] float32, blocks of `block_size` logical rows (nb == 1: one block).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;  // columns are split between threads in multiples of this

// table[c & 15] for eight codes: vpermps reads the low three bits of each lane and the
// blend takes the upper half of the table where bit 3 is set (the sign bit of `bit3`).
inline __m256 Lookup16(__m256 t0, __m256 t1, __m256i c, __m256i bit3) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, c), _mm256_permutevar8x32_ps(t1, c),
                          _mm256_castsi256_ps(bit3));
}

// Both nibbles of eight bytes (zero-extended into 32-bit lanes), looked up.
inline void Nibbles(__m256 t0, __m256 t1, __m256i b, __m256* lo, __m256* hi) {
  *lo = Lookup16(t0, t1, b, _mm256_slli_epi32(b, 28));
  *hi = Lookup16(t0, t1, _mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
}

inline __m256i Load8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i Load8Signed(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

struct Args4 {
  const float* x;        // [M, 2R]
  const uint8_t* codes;  // [R, N]
  const float* scales;   // [nb, N]
  const float* table;    // [16]
  float* y;              // [M, N]
  int64_t m, r, n, nb, block;
};

// Columns whose partial sums stay in L1 while rows stream past: long contiguous runs of
// each code row keep the prefetchers busy (256 ran 1.5-2x slower than 2048 at M = 1).
constexpr int64_t kPanel = 2048;

// Columns [n0, n1) of every row of y. For each group of rows that shares a scale row, a
// panel of columns is walked row by row (contiguous bytes), summing unscaled products in
// an L1 buffer; the panel is then scaled into y.
void Packed4Columns(const Args4& a, int64_t n0, int64_t n1) {
  const __m256 t0 = _mm256_loadu_ps(a.table), t1 = _mm256_loadu_ps(a.table + 8);
  const int64_t g = a.nb == 1 ? a.r : a.block;   // rows per group: one scale row per half
  const int64_t groups = a.r / g, hi_row0 = a.nb == 1 ? 0 : a.r / a.block;
  alignas(32) float lo[kPanel], hi[kPanel];
  for (int64_t mi = 0; mi < a.m; ++mi) {
    const float* x = a.x + mi * 2 * a.r;
    float* y = a.y + mi * a.n;
    std::fill(y + n0, y + n1, 0.0f);
    for (int64_t j = 0; j < groups; ++j) {
      const float* s_lo = a.scales + (a.nb == 1 ? 0 : j) * a.n;
      const float* s_hi = a.scales + (a.nb == 1 ? 0 : hi_row0 + j) * a.n;
      const int64_t r0 = j * g;
      for (int64_t c0 = n0; c0 < n1; c0 += kPanel) {
        const int64_t w = std::min(kPanel, n1 - c0), wv = w / 8 * 8;
        std::fill(lo, lo + w, 0.0f);
        std::fill(hi, hi + w, 0.0f);
        int64_t r = r0;
        for (; r + 4 <= r0 + g; r += 4) {  // four rows per pass over the panel
          const uint8_t* p = a.codes + r * a.n + c0;
          __m256 xl[4], xh[4];
          for (int q = 0; q < 4; ++q) {
            xl[q] = _mm256_set1_ps(x[r + q]);
            xh[q] = _mm256_set1_ps(x[a.r + r + q]);
          }
          for (int64_t i = 0; i < wv; i += 8) {
            __m256 al = _mm256_load_ps(lo + i), ah = _mm256_load_ps(hi + i);
            for (int q = 0; q < 4; ++q) {
              __m256 vl, vh;
              Nibbles(t0, t1, Load8(p + q * a.n + i), &vl, &vh);
              al = _mm256_fmadd_ps(vl, xl[q], al);
              ah = _mm256_fmadd_ps(vh, xh[q], ah);
            }
            _mm256_store_ps(lo + i, al);
            _mm256_store_ps(hi + i, ah);
          }
          for (int64_t i = wv; i < w; ++i)
            for (int q = 0; q < 4; ++q) {
              lo[i] += x[r + q] * a.table[p[q * a.n + i] & 15];
              hi[i] += x[a.r + r + q] * a.table[p[q * a.n + i] >> 4];
            }
        }
        for (; r < r0 + g; ++r) {
          const uint8_t* p = a.codes + r * a.n + c0;
          const __m256 xl = _mm256_set1_ps(x[r]), xh = _mm256_set1_ps(x[a.r + r]);
          for (int64_t i = 0; i < wv; i += 8) {
            __m256 vl, vh;
            Nibbles(t0, t1, Load8(p + i), &vl, &vh);
            _mm256_store_ps(lo + i, _mm256_fmadd_ps(vl, xl, _mm256_load_ps(lo + i)));
            _mm256_store_ps(hi + i, _mm256_fmadd_ps(vh, xh, _mm256_load_ps(hi + i)));
          }
          for (int64_t i = wv; i < w; ++i) {
            lo[i] += x[r] * a.table[p[i] & 15];
            hi[i] += x[a.r + r] * a.table[p[i] >> 4];
          }
        }
        for (int64_t i = 0; i < w; ++i) y[c0 + i] += lo[i] * s_lo[c0 + i] + hi[i] * s_hi[c0 + i];
      }
    }
  }
}

struct Args8 {
  const float* x;       // [M, K]
  const int8_t* codes;  // [K, N]
  const float* scales;  // [nb, N]
  float* y;             // [M, N]
  int64_t m, k, n, nb, block;
};

void Int8Columns(const Args8& a, int64_t n0, int64_t n1) {
  const int64_t g = a.nb == 1 ? a.k : a.block;
  const int64_t groups = a.k / g;
  alignas(32) float acc[kPanel];
  for (int64_t mi = 0; mi < a.m; ++mi) {
    const float* x = a.x + mi * a.k;
    float* y = a.y + mi * a.n;
    std::fill(y + n0, y + n1, 0.0f);
    for (int64_t j = 0; j < groups; ++j) {
      const float* s = a.scales + (a.nb == 1 ? 0 : j) * a.n;
      const int64_t r0 = j * g;
      for (int64_t c0 = n0; c0 < n1; c0 += kPanel) {
        const int64_t w = std::min(kPanel, n1 - c0), wv = w / 8 * 8;
        std::fill(acc, acc + w, 0.0f);
        int64_t r = r0;
        for (; r + 4 <= r0 + g; r += 4) {
          const int8_t* p = a.codes + r * a.n + c0;
          __m256 xv[4];
          for (int q = 0; q < 4; ++q) xv[q] = _mm256_set1_ps(x[r + q]);
          for (int64_t i = 0; i < wv; i += 8) {
            __m256 v = _mm256_load_ps(acc + i);
            for (int q = 0; q < 4; ++q)
              v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Load8Signed(p + q * a.n + i)), xv[q], v);
            _mm256_store_ps(acc + i, v);
          }
          for (int64_t i = wv; i < w; ++i)
            for (int q = 0; q < 4; ++q) acc[i] += x[r + q] * p[q * a.n + i];
        }
        for (; r < r0 + g; ++r) {
          const int8_t* p = a.codes + r * a.n + c0;
          const __m256 xv = _mm256_set1_ps(x[r]);
          for (int64_t i = 0; i < wv; i += 8)
            _mm256_store_ps(acc + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(Load8Signed(p + i)), xv,
                                                     _mm256_load_ps(acc + i)));
          for (int64_t i = wv; i < w; ++i) acc[i] += x[r] * p[i];
        }
        for (int64_t i = 0; i < w; ++i) y[c0 + i] += acc[i] * s[c0 + i];
      }
    }
  }
}

// Splits the columns into `threads` ranges of whole tiles and runs `work` on each.
template <typename F>
void OverColumns(int64_t n, int64_t threads, F work) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  threads = std::max<int64_t>(1, std::min(threads, tiles));
  if (threads == 1) {
    work(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (tiles + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t n0 = std::min(n, t * per * kTile), n1 = std::min(n, (t + 1) * per * kTile);
    if (n0 < n1) pool.emplace_back(work, n0, n1);
  }
  work(0, std::min(n, per * kTile));
  for (auto& th : pool) th.join();
}

ffi::Error Packed4Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> table,
                       ffi::ResultBuffer<ffi::F32> y, int64_t block_size, int64_t threads) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || table.element_count() != 16)
    return ffi::Error::InvalidArgument("qkern_packed4_gemv: expected x[M, K], codes[K/2, N], "
                                       "scales[nb, N] and a 16-entry table");
  Args4 a{x.typed_data(), codes.typed_data(), scales.typed_data(), table.typed_data(),
          y->typed_data(), xd[0], cd[0], cd[1], sd[0], block_size};
  if (xd[1] != 2 * a.r || sd[1] != a.n || (a.nb != 1 && (a.nb * a.block != 2 * a.r ||
                                                        a.nb % 2 != 0)))
    return ffi::Error::InvalidArgument("qkern_packed4_gemv: inconsistent shapes");
  OverColumns(a.n, threads, [&a](int64_t n0, int64_t n1) { Packed4Columns(a, n0, n1); });
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                    ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y,
                    int64_t block_size, int64_t threads) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("qkern_int8_gemv: expected x[M, K], codes[K, N], scales[nb, N]");
  Args8 a{x.typed_data(), codes.typed_data(), scales.typed_data(), y->typed_data(),
          xd[0], cd[0], cd[1], sd[0], block_size};
  if (xd[1] != a.k || sd[1] != a.n || (a.nb != 1 && a.nb * a.block != a.k))
    return ffi::Error::InvalidArgument("qkern_int8_gemv: inconsistent shapes");
  OverColumns(a.n, threads, [&a](int64_t n0, int64_t n1) { Int8Columns(a, n0, n1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernPacked4Gemv, Packed4Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernInt8Gemv, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads"));

// Whether this CPU runs the kernels (the library is built with -mavx2 -mfma).
extern "C" int qkern_native_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
