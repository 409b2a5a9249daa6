// qkern's native CPU kernels: y[M, N] = x[M, K] @ W[K, N] with W quantised (streaming and
// register-tiled for small M, a blocked GEMM from kGemmFrom rows),
// called from XLA through the FFI (see __init__.py, which builds and registers this file).
//
// One source, compiled once per instruction-set variant (_build.py picks the best the CPU
// runs): without QKERN_AVX512, for x86-64 with AVX2, FMA and F16C (the floor: 256-bit
// vectors, eight codes at a time); with QKERN_AVX512 (and -mavx512f -mavx512bw
// -mavx512vl), the same loops on 512-bit vectors, sixteen codes at a time.
//
// Two kernels per code kind. Below kTiledFrom rows of x the streaming kernel walks each
// code row's columns contiguously, summing into partial-sum panels in L1 (the weight's
// bytes are the cost there). From kTiledFrom rows the register-tiled kernel keeps the sums
// of up to 16 rows of x over one vector of columns in registers down K, decoding and
// scaling each code once for all of them (the FMAs are the cost there).
//
// Codes are decoded in registers and never written out: 4-bit codes
// go through a 16-entry table (AVX2: held in two registers, vpermps on the low three bits
// and a blend on the fourth; AVX-512: one register, one vpermps), except int4's, which are
// sign-extended and converted (the same values, no shuffles), int8 codes are widened
// and converted, fp8 codes are moved into float16 bit patterns and converted by vcvtph2ps
// (E5M2 is the top byte of a float16; E4M3FN is rebiased by a factor 2^8 and its one NaN
// code blended in), subnormals, inf and NaN included. The streaming kernel sums the
// products of each block of rows unscaled, then scales once per column; the tiled kernel
// scales each decoded code (T[c] * s) before its FMAs. Zero points are left to the caller
// (a [M, nb] @ [nb, N] term). Both variants pick the same kernel for the same call and do
// the same float32 operations in the same order per column (the columns past the last
// whole vector with scalar fused multiply-adds), so they give the same results, bit for bit.
//
// Storage (qkern/pallas/_operand.py): 4-bit codes are uint8 [R, N], byte row r holding
// logical row r in its low nibble and row r + R in its high nibble; int8 and fp8 codes
// are one byte each, [K, N].
// scales are [nb, N] float32, blocks of `block_size` logical rows (nb == 1: one block).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;  // columns are split between threads in multiples of this
constexpr int64_t kLine = 64;  // bytes per cache line

// -- the vector layer: everything below it is written once for both variants -----------
#if defined(QKERN_AVX512)
constexpr int64_t kW = 16;        // float lanes per vector
constexpr size_t kAlign = 64;
using VF = __m512;
inline VF VLoad(const float* p) { return _mm512_load_ps(p); }
inline void VStore(float* p, VF v) { _mm512_store_ps(p, v); }
inline VF VLoadU(const float* p) { return _mm512_loadu_ps(p); }
inline void VStoreU(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF VMul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF VAdd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF VFma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF VSplat(float v) { return _mm512_set1_ps(v); }

inline __m128i Load16Bytes(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// A 16-entry float table in one register: vpermps reads the low four bits of each lane.
struct Table16 {
  explicit Table16(const float* t) : t(_mm512_loadu_ps(t)) {}
  // Both nibbles of kW bytes, looked up.
  void Nibbles(const uint8_t* p, VF* lo, VF* hi) const {
    const __m512i b = _mm512_cvtepu8_epi32(Load16Bytes(p));
    *lo = _mm512_permutexvar_ps(b, t);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
  }
  __m512 t;
};

// int4's two's complement nibbles, sign-extended and converted: no table, so no vpermps
// (the AVX-512 shuffle port also runs half the FMAs).
struct NibbleInts {
  explicit NibbleInts(const float*) {}
  void Nibbles(const uint8_t* p, VF* lo, VF* hi) const {
    const __m512i b = _mm512_cvtepu8_epi32(Load16Bytes(p));
    *lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
    *hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28));
  }
};
#else
constexpr int64_t kW = 8;
constexpr size_t kAlign = 32;
using VF = __m256;
inline VF VLoad(const float* p) { return _mm256_load_ps(p); }
inline void VStore(float* p, VF v) { _mm256_store_ps(p, v); }
inline VF VLoadU(const float* p) { return _mm256_loadu_ps(p); }
inline void VStoreU(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF VMul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF VAdd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF VFma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF VSplat(float v) { return _mm256_set1_ps(v); }

inline __m128i Load8Bytes(const uint8_t* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}

// A 16-entry float table in two registers: vpermps reads the low three bits of each lane,
// and the blend takes the upper half of the table where bit 3 is set (the sign bit of
// `bit3`).
struct Table16 {
  explicit Table16(const float* t) : t0(_mm256_loadu_ps(t)), t1(_mm256_loadu_ps(t + 8)) {}
  __m256 Lookup(__m256i c, __m256i bit3) const {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, c), _mm256_permutevar8x32_ps(t1, c),
                            _mm256_castsi256_ps(bit3));
  }
  // Both nibbles of kW bytes (zero-extended into 32-bit lanes), looked up.
  void Nibbles(const uint8_t* p, VF* lo, VF* hi) const {
    const __m256i b = _mm256_cvtepu8_epi32(Load8Bytes(p));
    *lo = Lookup(b, _mm256_slli_epi32(b, 28));
    *hi = Lookup(_mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
  }
  __m256 t0, t1;
};

// int4's two's complement nibbles, sign-extended and converted: no table (AVX2's lookup
// costs two vpermps and a blend a nibble).
struct NibbleInts {
  explicit NibbleInts(const float*) {}
  void Nibbles(const uint8_t* p, VF* lo, VF* hi) const {
    const __m256i b = _mm256_cvtepu8_epi32(Load8Bytes(p));
    *lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
    *hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 24), 28));
  }
};
#endif

struct Args4 {
  const float* x;        // [M, 2R]
  const uint8_t* codes;  // [R, N]
  const float* scales;   // [nb, N]
  const float* table;    // [16]
  float* y;              // [M, N]
  int64_t m, r, n, nb, block;
  int64_t k;             // logical rows (<= 2R; the rest is padding, x zero there)
  int64_t xs;            // from one row of x to the next: 2R, or k for the GEMM (unpadded x)
};

// Whether the high nibbles of group j (the scale block hi_row0 + j; with one block, all
// of them) hold any logical row. Packing keeps an even number of blocks, so K = 384 in
// blocks of 128 is stored as 512 rows and the last group's high half is all padding:
// its products (x is zero there) are skipped, a quarter of the decoding and multiplying at
// that shape (its bytes are still read, for their low nibbles).
inline bool HighLive(const Args4& a, int64_t j) {
  return a.nb == 1 || a.r + j * a.block < a.k;
}

// Runs f(std::bool_constant<live>{}): the kernels' loops with or without the high nibbles.
template <typename F>
inline void WithHigh(bool live, F f) {
  if (live) f(std::true_type{});
  else f(std::false_type{});
}

// Columns of partial sums per row of x, kept in cache while code rows stream past: long
// contiguous runs of each code row keep the prefetchers busy (256 columns ran 1.5-2x
// slower than 2048 at M = 1; 2048 / MR per row, at MR = 4, cost int8 a third at M = 4).
constexpr int64_t kPanel = 2048;

// Partial sums (4 kPanel floats: the streaming kernel's rows of x times its panel, or the
// tiled kernel's between chunks): on the heap (32 KB would strain small thread stacks),
// aligned to a vector for the aligned vector loads.
struct Buffer {
  explicit Buffer(int64_t n)
      : data(static_cast<float*>(
            std::aligned_alloc(kAlign, (n * sizeof(float) + kAlign - 1) / kAlign * kAlign))) {}
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data;
};

// Fetches U rows (`stride` bytes apart) of the cache line at pf + i into cache. Code rows
// are a page apart at N = 4096 and each thread reads part of each: the hardware
// prefetchers, which stop at pages, barely help, so the rows the next call reads are fetched
// while these are used (int8 ran 1.3-1.6x faster at M = 1, 4-bit formats 1.1-1.2x).
template <int U>
inline void Prefetch(const uint8_t* pf, int64_t stride, int64_t i) {
  for (int q = 0; q < U; ++q)
    _mm_prefetch(reinterpret_cast<const char*>(pf + q * stride + i), _MM_HINT_T0);
}

// Adds U code rows from row r (columns c0 .. c0 + w) into the partial sums of MR rows of x
// (panels of pw columns each): each code is decoded once for all MR rows.
template <int U, int MR, bool HI, typename T>
inline void Packed4AddRows(const Args4& a, const float* x, int64_t r, int64_t c0, int64_t w,
                           int64_t pw, float* lo, float* hi, const T& t) {
  const uint8_t* p = a.codes + r * a.n + c0;
  const int64_t wv = w / kW * kW, xs = 2 * a.r;  // xs: from one row of x to the next
  VF xl[U][MR], xh[U][MR];  // the x values, broadcast once (the stores below may alias x)
  for (int q = 0; q < U; ++q)
    for (int k = 0; k < MR; ++k) {
      xl[q][k] = VSplat(x[k * xs + r + q]);
      if (HI) xh[q][k] = VSplat(x[k * xs + a.r + r + q]);
    }
  const uint8_t* pf = r + 2 * U <= a.r ? p + U * a.n : nullptr;
  for (int64_t i = 0; i < wv; i += kW) {
    if (pf != nullptr && i % kLine == 0) Prefetch<U>(pf, a.n, i);
    VF al[MR], ah[MR];
    for (int k = 0; k < MR; ++k) {
      al[k] = VLoad(lo + k * pw + i);
      if (HI) ah[k] = VLoad(hi + k * pw + i);
    }
    for (int q = 0; q < U; ++q) {
      VF vl, vh;
      t.Nibbles(p + q * a.n + i, &vl, &vh);
      for (int k = 0; k < MR; ++k) {
        al[k] = VFma(vl, xl[q][k], al[k]);
        if (HI) ah[k] = VFma(vh, xh[q][k], ah[k]);
      }
    }
    for (int k = 0; k < MR; ++k) {
      VStore(lo + k * pw + i, al[k]);
      if (HI) VStore(hi + k * pw + i, ah[k]);
    }
  }
  for (int64_t i = wv; i < w; ++i)  // the last columns, one at a time, fused as above
    for (int q = 0; q < U; ++q) {
      const uint8_t b = p[q * a.n + i];
      for (int k = 0; k < MR; ++k) {
        lo[k * pw + i] = std::fma(a.table[b & 15], x[k * xs + r + q], lo[k * pw + i]);
        if (HI)
          hi[k * pw + i] = std::fma(a.table[b >> 4], x[k * xs + a.r + r + q], hi[k * pw + i]);
      }
    }
}

// Columns [n0, n1) of MR rows of y. For each group of code rows that shares a scale row, a
// panel of columns is walked row by row (contiguous bytes), summing unscaled products in
// L1 buffers; the panel is then scaled into y.
template <int MR, typename T>
void Packed4Block(const Args4& a, const float* x, float* y, int64_t n0, int64_t n1,
                  float* lo, float* hi) {
  const T t(a.table);
  const int64_t g = a.nb == 1 ? a.r : a.block;   // rows per group: one scale row per half
  const int64_t groups = a.r / g, hi_row0 = a.nb == 1 ? 0 : a.r / a.block;
  const int64_t pw = kPanel;
  for (int k = 0; k < MR; ++k) std::fill(y + k * a.n + n0, y + k * a.n + n1, 0.0f);
  for (int64_t j = 0; j < groups; ++j) {
    const float* s_lo = a.scales + (a.nb == 1 ? 0 : j) * a.n;
    const float* s_hi = a.scales + (a.nb == 1 ? 0 : hi_row0 + j) * a.n;
    const int64_t r0 = j * g;
    const bool high = HighLive(a, j);
    for (int64_t c0 = n0; c0 < n1; c0 += pw) {
      const int64_t w = std::min(pw, n1 - c0);
      std::fill(lo, lo + MR * pw, 0.0f);
      std::fill(hi, hi + MR * pw, 0.0f);
      WithHigh(high, [&](auto hl) {
        constexpr bool HI = decltype(hl)::value;
        int64_t r = r0;
        for (; r + 4 <= r0 + g; r += 4) Packed4AddRows<4, MR, HI, T>(a, x, r, c0, w, pw, lo, hi, t);
        for (; r < r0 + g; ++r) Packed4AddRows<1, MR, HI, T>(a, x, r, c0, w, pw, lo, hi, t);
      });
      for (int k = 0; k < MR; ++k)
        for (int64_t i = 0; i < w; ++i)
          y[k * a.n + c0 + i] += high ? lo[k * pw + i] * s_lo[c0 + i] + hi[k * pw + i] * s_hi[c0 + i]
                                      : lo[k * pw + i] * s_lo[c0 + i];
    }
  }
}

// -- the register-tiled kernels, from kTiledFrom rows of x: the sums of MR rows of x over one
// vector of columns (a strip) stay in registers while kChunk code rows pass; each code is
// decoded and scaled once (w = T[c] * s) for all MR rows. The strips of a panel of columns
// take turns per chunk of rows, so that the four (AVX2: eight) strips that share a cache
// line of codes read it from L1; the sums wait in a buffer between chunks. Per column
// and row of x the order is fixed, for each code row r the low nibble's product, then the
// high one's (4-bit), so every MR and both variants give the same sums bit for bit.
// Against the streaming kernel's eight rows per pass (2-core Xeon with AVX-512, nf4 and
// fp8_e4m3, K = N = 4096): 1.2-1.6x faster at M = 8-32 with the weight in cache, 1.1-1.5x
// from memory; AVX2 1.1-1.2x (docs/benchmarks.md).
// Walking K a strip at a time, without chunks and panels, ran 2x slower (every code row a
// page apart, each cache line read four times); reading x in place, 1.5x slower (x's rows,
// a power of two floats apart, fall in one set of L1): x is copied per chunk instead.
constexpr int64_t kTiledFrom = 8;
constexpr int kTiledRows = kW == 16 ? 16 : 8;  // AVX2's sixteen registers hold eight sums
constexpr int64_t kChunk = 64;                  // code rows per turn (16-128 ran alike)

// Runs f(std::integral_constant<int, MR>{}, i) over the rows of x from row i, MR rows at
// a time: kTiledRows, then eight, four, two and one.
template <typename F>
void OverTiledRows(int64_t m, F f) {
  int64_t i = 0;
  for (; i + kTiledRows <= m; i += kTiledRows) f(std::integral_constant<int, kTiledRows>{}, i);
  for (; i + 8 <= m; i += 8) f(std::integral_constant<int, 8>{}, i);
  for (; i + 4 <= m; i += 4) f(std::integral_constant<int, 4>{}, i);
  for (; i + 2 <= m; i += 2) f(std::integral_constant<int, 2>{}, i);
  for (; i < m; ++i) f(std::integral_constant<int, 1>{}, i);
}

// The strips of a panel read its code rows line after line: from the strip at column i of
// a panel w columns wide, in code rows up to r1 (of rows, n bytes apart), the bytes to the
// line two ahead, wrapping into the next chunk's rows (0: none left).
inline int64_t Ahead(int64_t i, int64_t w, int64_t r1, int64_t rows, int64_t n) {
  if (i + 2 * kLine < w) return 2 * kLine;
  return r1 + kChunk <= rows ? kChunk * n + 2 * kLine - w : 0;
}

// Adds code rows [r0, r1) (one scale row) into the sums of MR rows of x over one vector of
// columns at c: from `in` (nullptr: zero; rows `pw` floats apart) to `out` (rows `stride`
// floats apart).
template <int MR, bool HI, typename T>
inline void Packed4Strip(const Args4& a, const float* xp, int64_t r0, int64_t r1, int64_t j,
                         int64_t c, const float* in, int64_t pw, float* out, int64_t stride,
                         int64_t ahead, const T& t) {
  const int64_t hi_row0 = a.nb == 1 ? 0 : a.r / a.block;
  VF acc[MR];
  for (int k = 0; k < MR; ++k) acc[k] = in == nullptr ? VSplat(0.0f) : VLoadU(in + k * pw);
  const VF sl = VLoadU(a.scales + j * a.n + c);
  const VF sh = VLoadU(a.scales + (hi_row0 + j) * a.n + c);
  // the first strip to read these cache lines fetches the line `ahead` of each code row into
  // L2 (into L1 the tiled kernel ran at 0.9x of the streaming one at M = 8, weight in
  // memory, against 1.1-1.2x)
  const bool lead = c % kLine == 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = a.codes + r * a.n + c;
    if (lead && ahead != 0) _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
    VF vl, vh;
    t.Nibbles(p, &vl, &vh);
    vl = VMul(vl, sl);
    const float* xr = xp + (r - r0) * 2 * MR;
    for (int k = 0; k < MR; ++k) acc[k] = VFma(vl, VSplat(xr[k]), acc[k]);
    if (HI) {
      vh = VMul(vh, sh);
      for (int k = 0; k < MR; ++k) acc[k] = VFma(vh, VSplat(xr[MR + k]), acc[k]);
    }
  }
  for (int k = 0; k < MR; ++k) VStoreU(out + k * stride, acc[k]);
}

// The columns past the last whole vector, one at a time, in the order of Packed4Strip.
inline void Packed4TiledTail(const Args4& a, const float* x, float* y, int64_t m, int64_t c) {
  const int64_t xs = 2 * a.r, g = a.nb == 1 ? a.r : a.block, hi_row0 = a.nb == 1 ? 0 : a.r / a.block;
  for (int64_t k = 0; k < m; ++k) {
    float acc = 0.0f;
    for (int64_t r = 0; r < a.r; ++r) {
      const int64_t j = r / g;
      const uint8_t b = a.codes[r * a.n + c];
      const float wl = a.table[b & 15] * a.scales[j * a.n + c];
      acc = std::fma(wl, x[k * xs + r], acc);
      if (!HighLive(a, j)) continue;
      const float wh = a.table[b >> 4] * a.scales[(hi_row0 + j) * a.n + c];
      acc = std::fma(wh, x[k * xs + a.r + r], acc);
    }
    y[k * a.n + c] = acc;
  }
}

template <int MR, typename T>
void Packed4Tiled(const Args4& a, const float* x, float* y, int64_t n0, int64_t n1, float* buf) {
  const T t(a.table);
  const int64_t g = a.nb == 1 ? a.r : a.block, pw = kPanel * 4 / MR / kW * kW;
  const int64_t wv = (n1 - n0) / kW * kW;
  alignas(64) float xp[2 * kChunk * MR];
  for (int64_t c0 = n0; c0 < n0 + wv; c0 += pw) {
    const int64_t w = std::min(pw, n0 + wv - c0);
    for (int64_t r0 = 0; r0 < a.r; r0 += g) {
      const bool high = HighLive(a, r0 / g);
      for (int64_t r = r0; r < r0 + g; r += kChunk) {
        const int64_t r1 = std::min(r + kChunk, r0 + g);
        const bool first = r == 0, last = r1 == a.r;
        // x's values for these code rows, each row's 2 MR (low and high) side by side: x's
        // rows, a power of two floats apart, would otherwise crowd one set of L1
        for (int64_t q = r; q < r1; ++q)
          for (int k = 0; k < MR; ++k) {
            xp[(q - r) * 2 * MR + k] = x[k * 2 * a.r + q];
            xp[(q - r) * 2 * MR + MR + k] = x[k * 2 * a.r + a.r + q];
          }
        for (int64_t i = 0; i < w; i += kW) {
          float* out = last ? y + c0 + i : buf + i;
          const float* in = first ? nullptr : buf + i;
          const int64_t stride = last ? a.n : pw, ahead = Ahead(i, w, r1, a.r, a.n);
          WithHigh(high, [&](auto hl) {
            Packed4Strip<MR, decltype(hl)::value, T>(a, xp, r, r1, r0 / g, c0 + i, in, pw, out,
                                                     stride, ahead, t);
          });
        }
      }
    }
  }
  for (int64_t c = n0 + wv; c < n1; ++c) Packed4TiledTail(a, x, y, MR, c);
}

template <typename T>
bool Packed4Columns(const Args4& a, int64_t n0, int64_t n1) {
  Buffer lo(4 * kPanel), hi(4 * kPanel);
  if (lo.data == nullptr || hi.data == nullptr) return false;
  if (a.m >= kTiledFrom) {
    // AVX-512: int4 through its table too (one vpermps beats the shifts and convert when
    // the FMAs and the decode share two ports); AVX2 keeps NibbleInts (its lookup is three)
    using TT = std::conditional_t<kW == 16, Table16, T>;
    OverTiledRows(a.m, [&](auto mr, int64_t i) {
      Packed4Tiled<decltype(mr)::value, TT>(a, a.x + i * 2 * a.r, a.y + i * a.n, n0, n1, lo.data);
    });
    return true;
  }
  int64_t i = 0;
  for (; i + 4 <= a.m; i += 4)
    Packed4Block<4, T>(a, a.x + i * 2 * a.r, a.y + i * a.n, n0, n1, lo.data, hi.data);
  for (; i + 2 <= a.m; i += 2)
    Packed4Block<2, T>(a, a.x + i * 2 * a.r, a.y + i * a.n, n0, n1, lo.data, hi.data);
  for (; i < a.m; ++i)
    Packed4Block<1, T>(a, a.x + i * 2 * a.r, a.y + i * a.n, n0, n1, lo.data, hi.data);
  return true;
}

struct Args8 {
  const float* x;        // [M, K]
  const uint8_t* codes;  // [K, N], one byte per code (int8 or fp8 bit patterns)
  const float* scales;   // [nb, N]
  float* y;              // [M, N]
  int64_t m, k, n, nb, block;
};

// One-byte codes to float32: kW at a time (Vec) and one at a time (One, the tail). kRows:
// rows of x per pass of the streaming kernel; kTiledCodes: the most codes (K x N) for
// which the tiled kernel runs from kTiledFrom rows of x.
// int8 streams weights above 4 MiB: at K = N = 4096, M = 8-16, its one byte a code per 8
// (AVX2) or 16 rows' FMAs left the tiled kernel waiting on memory (0.7-0.9x of streaming
// at M = 8, and on AVX2 at M = 16); fp8 and 4-bit decode enough per byte to gain anyway.
constexpr int64_t kInt8TiledCodes = int64_t{1} << 22;
#if defined(QKERN_AVX512)
struct Int8Codes {
  static constexpr int kRows = 8;
  static constexpr int64_t kTiledCodes = kInt8TiledCodes;
  static VF Vec(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(Load16Bytes(p)));
  }
  static float One(uint8_t b) { return static_cast<float>(static_cast<int8_t>(b)); }
};

struct E5M2Codes {  // float8_e5m2 is the top byte of a float16
  static constexpr int kRows = 4;
  static constexpr int64_t kTiledCodes = INT64_MAX;
  static VF Vec(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(Load16Bytes(p)), 8));
  }
  static float One(uint8_t b) { return _cvtsh_ss(static_cast<uint16_t>(b << 8)); }
};

struct E4M3Codes {  // float8_e4m3fn: bias 7, no inf, 0x7f / 0xff are NaN
  static constexpr int kRows = 4;
  static constexpr int64_t kTiledCodes = INT64_MAX;
  static VF Vec(const uint8_t* p) {
    const __m256i b = _mm256_cvtepu8_epi16(Load16Bytes(p));
    const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7f));
    const __m256i h = _mm256_or_si256(
        _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
        _mm256_slli_epi16(mag, 7));  // as float16: value / 2^8
    const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(mag, _mm256_set1_epi16(0x7f));
    return _mm512_mask_blend_ps(nan, v, _mm512_set1_ps(NAN));
  }
  static float One(uint8_t b) {
    if ((b & 0x7f) == 0x7f) return NAN;
    return _cvtsh_ss(static_cast<uint16_t>(((b & 0x80) << 8) | ((b & 0x7f) << 7))) * 256.0f;
  }
};
#else
struct Int8Codes {
  static constexpr int kRows = 8;
  static constexpr int64_t kTiledCodes = kInt8TiledCodes;
  static VF Vec(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(Load8Bytes(p))); }
  static float One(uint8_t b) { return static_cast<float>(static_cast<int8_t>(b)); }
};

struct E5M2Codes {  // float8_e5m2 is the top byte of a float16
  static constexpr int kRows = 4;
  static constexpr int64_t kTiledCodes = INT64_MAX;
  static VF Vec(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), Load8Bytes(p)));
  }
  static float One(uint8_t b) { return _cvtsh_ss(static_cast<uint16_t>(b << 8)); }
};

struct E4M3Codes {  // float8_e4m3fn: bias 7, no inf, 0x7f / 0xff are NaN
  static constexpr int kRows = 4;
  static constexpr int64_t kTiledCodes = INT64_MAX;
  static VF Vec(const uint8_t* p) {
    const __m128i b = _mm_cvtepu8_epi16(Load8Bytes(p));
    const __m128i mag = _mm_and_si128(b, _mm_set1_epi16(0x7f));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(mag, 7));  // as float16: value / 2^8
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
    const __m256i nan = _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7f)));
    return _mm256_blendv_ps(v, _mm256_set1_ps(NAN), _mm256_castsi256_ps(nan));
  }
  static float One(uint8_t b) {
    if ((b & 0x7f) == 0x7f) return NAN;
    return _cvtsh_ss(static_cast<uint16_t>(((b & 0x80) << 8) | ((b & 0x7f) << 7))) * 256.0f;
  }
};
#endif

template <typename D, int U, int MR>
inline void BytesAddRows(const Args8& a, const float* x, int64_t r, int64_t c0, int64_t w,
                         int64_t pw, float* acc) {
  const uint8_t* p = a.codes + r * a.n + c0;
  const int64_t wv = w / kW * kW;
  VF xv[U][MR];  // the x values, broadcast once (the stores below may alias x)
  for (int q = 0; q < U; ++q)
    for (int k = 0; k < MR; ++k) xv[q][k] = VSplat(x[k * a.k + r + q]);
  const uint8_t* pf = r + 2 * U <= a.k ? p + U * a.n : nullptr;  // as in Packed4AddRows
  for (int64_t i = 0; i < wv; i += kW) {
    if (pf != nullptr && i % kLine == 0) Prefetch<U>(pf, a.n, i);
    VF v[MR];
    for (int k = 0; k < MR; ++k) v[k] = VLoad(acc + k * pw + i);
    for (int q = 0; q < U; ++q) {
      const VF c = D::Vec(p + q * a.n + i);
      for (int k = 0; k < MR; ++k) v[k] = VFma(c, xv[q][k], v[k]);
    }
    for (int k = 0; k < MR; ++k) VStore(acc + k * pw + i, v[k]);
  }
  for (int64_t i = wv; i < w; ++i)  // the last columns, one at a time, fused as above
    for (int q = 0; q < U; ++q)
      for (int k = 0; k < MR; ++k)
        acc[k * pw + i] = std::fma(D::One(p[q * a.n + i]), x[k * a.k + r + q], acc[k * pw + i]);
}

template <typename D, int MR>
void BytesBlock(const Args8& a, const float* x, float* y, int64_t n0, int64_t n1, float* acc) {
  const int64_t g = a.nb == 1 ? a.k : a.block;
  const int64_t groups = a.k / g, pw = kPanel * 4 / std::max(MR, 4);  // MR * pw <= 4 kPanel
  for (int k = 0; k < MR; ++k) std::fill(y + k * a.n + n0, y + k * a.n + n1, 0.0f);
  for (int64_t j = 0; j < groups; ++j) {
    const float* s = a.scales + (a.nb == 1 ? 0 : j) * a.n;
    const int64_t r0 = j * g;
    for (int64_t c0 = n0; c0 < n1; c0 += pw) {
      const int64_t w = std::min(pw, n1 - c0);
      std::fill(acc, acc + MR * pw, 0.0f);
      int64_t r = r0;
      for (; r + 4 <= r0 + g; r += 4) BytesAddRows<D, 4, MR>(a, x, r, c0, w, pw, acc);
      for (; r < r0 + g; ++r) BytesAddRows<D, 1, MR>(a, x, r, c0, w, pw, acc);
      for (int k = 0; k < MR; ++k)
        for (int64_t i = 0; i < w; ++i) y[k * a.n + c0 + i] += acc[k * pw + i] * s[c0 + i];
    }
  }
}


// The register-tiled kernel of one-byte codes (see Packed4Strip): code rows [r0, r1), one
// scale row `j`, MR rows of x packed in `xp` ([r1 - r0][MR]), one vector of columns at c.
template <int MR, typename D>
inline void BytesStrip(const Args8& a, const float* xp, int64_t r0, int64_t r1, int64_t j,
                       int64_t c, const float* in, int64_t pw, float* out, int64_t stride,
                       int64_t ahead) {
  VF acc[MR];
  for (int k = 0; k < MR; ++k) acc[k] = in == nullptr ? VSplat(0.0f) : VLoadU(in + k * pw);
  const VF s = VLoadU(a.scales + j * a.n + c);
  const bool lead = c % kLine == 0;  // as in Packed4Strip
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = a.codes + r * a.n + c;
    if (lead && ahead != 0) _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
    const VF v = VMul(D::Vec(p), s);
    const float* xr = xp + (r - r0) * MR;
    for (int k = 0; k < MR; ++k) acc[k] = VFma(v, VSplat(xr[k]), acc[k]);
  }
  for (int k = 0; k < MR; ++k) VStoreU(out + k * stride, acc[k]);
}

template <int MR, typename D>
void BytesTiled(const Args8& a, const float* x, float* y, int64_t n0, int64_t n1, float* buf) {
  const int64_t g = a.nb == 1 ? a.k : a.block, pw = kPanel * 4 / MR / kW * kW;
  const int64_t wv = (n1 - n0) / kW * kW;
  alignas(64) float xp[kChunk * MR];
  for (int64_t c0 = n0; c0 < n0 + wv; c0 += pw) {
    const int64_t w = std::min(pw, n0 + wv - c0);
    for (int64_t r0 = 0; r0 < a.k; r0 += g)
      for (int64_t r = r0; r < r0 + g; r += kChunk) {
        const int64_t r1 = std::min(r + kChunk, r0 + g);
        const bool first = r == 0, last = r1 == a.k;
        for (int64_t q = r; q < r1; ++q)  // as in Packed4Tiled
          for (int k = 0; k < MR; ++k) xp[(q - r) * MR + k] = x[k * a.k + q];
        for (int64_t i = 0; i < w; i += kW)
          BytesStrip<MR, D>(a, xp, r, r1, r0 / g, c0 + i,
                            first ? nullptr : buf + i, pw, last ? y + c0 + i : buf + i,
                            last ? a.n : pw, Ahead(i, w, r1, a.k, a.n));
      }
  }
  for (int64_t c = n0 + wv; c < n1; ++c)  // the last columns, in BytesStrip's order
    for (int k = 0; k < MR; ++k) {
      float acc = 0.0f;
      for (int64_t r = 0; r < a.k; ++r)
        acc = std::fma(D::One(a.codes[r * a.n + c]) * a.scales[r / g * a.n + c],
                       x[k * a.k + r], acc);
      y[k * a.n + c] = acc;
    }
}

template <typename D>
bool BytesColumns(const Args8& a, int64_t n0, int64_t n1) {
  Buffer acc(4 * kPanel);
  if (acc.data == nullptr) return false;
  if (a.m >= kTiledFrom && a.k * a.n <= D::kTiledCodes) {
    OverTiledRows(a.m, [&](auto mr, int64_t i) {
      BytesTiled<decltype(mr)::value, D>(a, a.x + i * a.k, a.y + i * a.n, n0, n1, acc.data);
    });
    return true;
  }
  int64_t i = 0;
  for (; D::kRows > 4 && i + D::kRows <= a.m; i += D::kRows)
    BytesBlock<D, D::kRows>(a, a.x + i * a.k, a.y + i * a.n, n0, n1, acc.data);
  for (; i + 4 <= a.m; i += 4) BytesBlock<D, 4>(a, a.x + i * a.k, a.y + i * a.n, n0, n1, acc.data);
  for (; i + 2 <= a.m; i += 2) BytesBlock<D, 2>(a, a.x + i * a.k, a.y + i * a.n, n0, n1, acc.data);
  for (; i < a.m; ++i) BytesBlock<D, 1>(a, a.x + i * a.k, a.y + i * a.n, n0, n1, acc.data);
  return true;
}

// Splits the columns into `threads` ranges of whole tiles and runs `work` on each; false
// when any range failed (`work` returns false when it cannot allocate its buffers). The
// ranges are shared out through XLA's own intra-op thread pool (the FFI's ThreadPool
// context), whose threads are already running: starting threads per call cost 60-90 us
// on a 2-core VM, more than a whole small matmul. The pool may run a task late, on the
// calling thread, or not in parallel at all, so every task and the caller take ranges
// from one counter until none is left; the caller then waits only for ranges already
// taken, which are running. A task that starts after that finds nothing left and never
// touches `work` (the state it shares is reference-counted).
struct Share {
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> ok{true};
};

// Splits [0, count) into `threads` ranges of whole units and runs `work(lo, hi)` on each;
// false when any range failed (`work` returns false when it cannot allocate its buffers).
template <typename F>
bool OverRanges(ffi::ThreadPool& pool, int64_t count, int64_t unit, int64_t threads, F work) {
  const int64_t units = (count + unit - 1) / unit;
  threads = std::max<int64_t>(1, std::min(threads, units));
  if (threads == 1) return work(0, count);
  const int64_t per = (units + threads - 1) / threads;
  std::shared_ptr<Share> share;
  try {
    share = std::make_shared<Share>();
  } catch (...) {
    return false;
  }
  const F* job = &work;
  auto take = [share, job, count, unit, per, threads] {  // runs ranges until none is left
    for (int64_t t; (t = share->next.fetch_add(1)) < threads;) {
      const int64_t lo = std::min(count, t * per * unit);
      const int64_t hi = std::min(count, (t + 1) * per * unit);
      if (lo < hi && !(*job)(lo, hi)) share->ok = false;
      share->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    try {
      auto task = take;  // Schedule takes its task by value (an rvalue)
      pool.Schedule(std::move(task));
    } catch (...) {  // no task to be had: the caller takes its ranges below
      break;
    }
  }
  take();
  while (share->done.load(std::memory_order_acquire) < threads) _mm_pause();
  return share->ok;
}

template <typename F>
bool OverColumns(ffi::ThreadPool& pool, int64_t n, int64_t threads, F work) {
  return OverRanges(pool, n, kTile, threads, work);
}

// -- the blocked GEMM, from kGemmFrom rows of x (prefill, encoders): each weight block is
// decoded once per block of up to kGemmBlock rows of x and thread (a thread given a range
// of rows decodes the whole weight), scaled (T[c] * s, as dequantisation rounds it), into
// a panel in L2 that all the rows of that block then use, as a dense GEMM uses its packed weight; x's block is
// packed too, kGemmRows rows interleaved per step of K. The micro tile keeps the sums of
// kGemmRows rows over two vectors of columns in registers (AVX-512: 28 of 32, AVX2: 12 of
// 16) down a depth block of K, broadcasting one value of x per row per step: per value
// of x loaded, two FMAs; per weight vector, kGemmRows. The float32 dot of XLA:CPU runs
// at about 85-95% of the FMA peak at these shapes, so this gains little on it where the
// weight is small; it replaces the K-chunked scan (0.5-0.97x of dense at M = 64 against
// 0.8-2.0x; 0.77-0.95x at K = N = 4096 against 1.0-1.45x): docs/benchmarks.md, "The
// native GEMM". Its two halves (OverRanges) wait for a slow thread, which XLA's finely
// split dot does not: small weights from M = 128 keep dequantise-then-dot.
// Per element of y the sum runs over K in depth blocks, in the same order for every
// variant, tile and thread count: within a block an FMA chain from zero, then added to y
// (the first block stored), so both variants give the same bits.
constexpr int64_t kGemmFrom = 49;                 // the tiled kernel runs to 48 rows
constexpr int kGemmRows = kW == 16 ? 14 : 6;      // MR: rows of x per micro tile
constexpr int64_t kGemmCols = 2 * kW;             // NR: columns per micro tile
constexpr int64_t kGemmDepth = 256;               // KC: rows of K per depth block
constexpr int64_t kGemmPanel = 256;               // NC: columns decoded at a time
constexpr int64_t kGemmBlock = 504;               // MC: most rows of x per block (14 x 36)

// y[rows, cols] (rows `ldc` apart) = (first ? 0 : y) + A strip [kc][kGemmRows] times
// B strip [kc][kGemmCols]; rows and columns past `rows`, `cols` are computed, not stored.
inline void GemmTile(const float* ap, const float* bp, int64_t kc, float* c, int64_t ldc,
                     int64_t rows, int64_t cols, bool first) {
  VF acc[kGemmRows][2];
  for (int i = 0; i < kGemmRows; ++i) acc[i][0] = acc[i][1] = VSplat(0.0f);
  for (int64_t k = 0; k < kc; ++k) {
    const VF b0 = VLoad(bp + k * kGemmCols), b1 = VLoad(bp + k * kGemmCols + kW);
    const float* a = ap + k * kGemmRows;
#pragma GCC unroll 16
    for (int i = 0; i < kGemmRows; ++i) {
      const VF v = VSplat(a[i]);
      acc[i][0] = VFma(v, b0, acc[i][0]);
      acc[i][1] = VFma(v, b1, acc[i][1]);
    }
  }
  if (rows == kGemmRows && cols == kGemmCols) {
    for (int i = 0; i < kGemmRows; ++i) {
      float* ci = c + i * ldc;
      VStoreU(ci, first ? acc[i][0] : VAdd(VLoadU(ci), acc[i][0]));
      VStoreU(ci + kW, first ? acc[i][1] : VAdd(VLoadU(ci + kW), acc[i][1]));
    }
    return;
  }
  alignas(kAlign) float t[kGemmRows * kGemmCols];
  for (int i = 0; i < kGemmRows; ++i) {
    VStore(t + i * kGemmCols, acc[i][0]);
    VStore(t + i * kGemmCols + kW, acc[i][1]);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      c[i * ldc + j] = first ? t[i * kGemmCols + j] : c[i * ldc + j] + t[i * kGemmCols + j];
}

// A depth block: up to two runs of K (4-bit: low-nibble rows, then the high-nibble rows of
// the same bytes), `len` rows each from row `start` of K (x's column).
struct Depth {
  int64_t start[2], len[2];
  int64_t rows() const { return len[0] + len[1]; }
};

// Packs rows [i0, i0 + mb) of x (rows `xs` floats apart) over depth block d into strips of
// kGemmRows rows: ap[strip][k][kGemmRows], rows past mb zero.
inline void GemmPackX(const float* x, int64_t xs, int64_t i0, int64_t mb, const Depth& d,
                      float* ap) {
  const int64_t kc = d.rows();
  for (int64_t s = 0; s * kGemmRows < mb; ++s) {
    float* dst = ap + s * kc * kGemmRows;
    for (int i = 0; i < kGemmRows; ++i) {
      const int64_t row = s * kGemmRows + i;
      if (row >= mb) {
        for (int64_t k = 0; k < kc; ++k) dst[k * kGemmRows + i] = 0.0f;
        continue;
      }
      const float* xr = x + (i0 + row) * xs;
      int64_t k = 0;
      for (int q = 0; q < 2; ++q)
        for (int64_t j = 0; j < d.len[q]; ++j, ++k) dst[k * kGemmRows + i] = xr[d.start[q] + j];
    }
  }
}

// The micro tiles of x rows [i0, i0 + mb) (packed in ap) times one decoded panel (bp, nc
// columns from c0, strips of kGemmCols) into y.
inline void GemmPanel(const float* ap, const float* bp, int64_t kc, float* y, int64_t n,
                      int64_t i0, int64_t mb, int64_t c0, int64_t nc, bool first) {
  for (int64_t j = 0; j < nc; j += kGemmCols) {
    const float* bs = bp + j * kc;
    for (int64_t s = 0; s * kGemmRows < mb; ++s)
      GemmTile(ap + s * kc * kGemmRows, bs, kc, y + (i0 + s * kGemmRows) * n + c0 + j, n,
               std::min<int64_t>(kGemmRows, mb - s * kGemmRows),
               std::min<int64_t>(kGemmCols, nc - j), first);
  }
}

// Rows [m0, m1) and columns [n0, n1) of y = x @ W: x's rows in blocks of about kGemmBlock,
// K in depth blocks; per depth block x's block is packed, and the weight decoded a panel
// of columns at a time (decode(bp, d, c0, nc): rows of d, strips of kGemmCols columns,
// zero past nc).
template <typename Decode>
bool GemmRange(const float* x, int64_t xs, float* y, int64_t n, int64_t m0, int64_t m1,
               int64_t n0, int64_t n1, const std::vector<Depth>& depths, Decode decode) {
  const int64_t blocks = (m1 - m0 + kGemmBlock - 1) / kGemmBlock;
  const int64_t per = ((m1 - m0 + blocks - 1) / blocks + kGemmRows - 1) / kGemmRows * kGemmRows;
  Buffer ap(per * kGemmDepth), bp(kGemmPanel * kGemmDepth);
  if (ap.data == nullptr || bp.data == nullptr) return false;
  for (int64_t i0 = m0; i0 < m1; i0 += per) {
    const int64_t mb = std::min(per, m1 - i0);
    for (size_t q = 0; q < depths.size(); ++q) {
      const Depth& d = depths[q];
      GemmPackX(x, xs, i0, mb, d, ap.data);
      for (int64_t c0 = n0; c0 < n1; c0 += kGemmPanel) {
        const int64_t nc = std::min(kGemmPanel, n1 - c0);
        decode(bp.data, d, c0, nc);
        GemmPanel(ap.data, bp.data, d.rows(), y, n, i0, mb, c0, nc, q == 0);
      }
    }
  }
  return true;
}

// Runs the GEMM over `threads` ranges: of rows when x has at least as many as y has
// columns (each thread decodes the whole weight for its rows), else of columns (each packs
// all of x).
template <typename Decode>
bool Gemm(ffi::ThreadPool& pool, const float* x, int64_t xs, float* y, int64_t m, int64_t n,
          int64_t threads, const std::vector<Depth>& depths, Decode decode) {
  if (m >= n)
    return OverRanges(pool, m, kGemmRows, threads, [&](int64_t m0, int64_t m1) {
      return GemmRange(x, xs, y, n, m0, m1, 0, n, depths, decode); });
  return OverRanges(pool, n, kGemmCols, threads, [&](int64_t n0, int64_t n1) {
    return GemmRange(x, xs, y, n, 0, m, n0, n1, depths, decode); });
}

// Where column j of a panel's row 0 lies (strips of kGemmCols columns, kc rows each).
inline int64_t PanelAt(int64_t j, int64_t kc) {
  return (j / kGemmCols) * kc * kGemmCols + j % kGemmCols;
}

// The panel's columns past the last whole vector (nc - nc % kW .. nc) of one row at `row`,
// one(c) each, and zeros to the end of its last strip.
template <typename One>
inline void GemmPanelTail(float* row, int64_t kc, int64_t c0, int64_t nc, One one) {
  const int64_t padded = (nc + kGemmCols - 1) / kGemmCols * kGemmCols;
  for (int64_t j = nc / kW * kW; j < padded; ++j)
    row[PanelAt(j, kc)] = j < nc ? one(c0 + j) : 0.0f;
}

// 4-bit codes: depth blocks of kGemmDepth / 2 byte rows, each the low-nibble rows of those
// bytes, then their live high-nibble rows (logical rows below k).
template <typename T>
bool Packed4Gemm(ffi::ThreadPool& pool, const Args4& a, int64_t threads) {
  std::vector<Depth> depths;
  try {
    for (int64_t r0 = 0; r0 < a.r; r0 += kGemmDepth / 2) {
      const int64_t h = std::min(kGemmDepth / 2, a.r - r0);
      const int64_t lo = std::clamp<int64_t>(a.k - r0, 0, h);
      const int64_t hi = std::clamp<int64_t>(a.k - a.r - r0, 0, h);
      if (lo + hi > 0) depths.push_back(Depth{{r0, a.r + r0}, {lo, hi}});
    }
  } catch (...) {  // no memory: the caller reports it
    return false;
  }
  const T t(a.table);
  auto decode = [&a, &t](float* bp, const Depth& d, int64_t c0, int64_t nc) {
    const int64_t kc = d.rows(), whole = nc / kW * kW;
    for (int64_t j = 0; j < d.len[0]; ++j) {
      const int64_t r = d.start[0] + j;
      const uint8_t* p = a.codes + r * a.n;
      const float* s_lo = a.scales + (a.nb == 1 ? 0 : r / a.block) * a.n;
      const float* s_hi = a.scales + (a.nb == 1 ? 0 : (r + a.r) / a.block) * a.n;
      float* lo = bp + j * kGemmCols;
      float* hi = bp + (d.len[0] + j) * kGemmCols;
      const bool live = j < d.len[1];
      for (int64_t q = 0; q < whole; q += kW) {
        VF vl, vh;
        t.Nibbles(p + c0 + q, &vl, &vh);
        VStore(lo + PanelAt(q, kc), VMul(vl, VLoadU(s_lo + c0 + q)));
        if (live) VStore(hi + PanelAt(q, kc), VMul(vh, VLoadU(s_hi + c0 + q)));
      }
      GemmPanelTail(lo, kc, c0, nc, [&](int64_t c) { return a.table[p[c] & 15] * s_lo[c]; });
      if (live)
        GemmPanelTail(hi, kc, c0, nc, [&](int64_t c) { return a.table[p[c] >> 4] * s_hi[c]; });
    }
  };
  return Gemm(pool, a.x, a.xs, a.y, a.m, a.n, threads, depths, decode);
}

// One-byte codes: depth blocks of kGemmDepth rows of K.
template <typename D>
bool BytesGemm(ffi::ThreadPool& pool, const Args8& a, int64_t threads) {
  std::vector<Depth> depths;
  try {
    for (int64_t k0 = 0; k0 < a.k; k0 += kGemmDepth)
      depths.push_back(Depth{{k0, 0}, {std::min(kGemmDepth, a.k - k0), 0}});
  } catch (...) {  // no memory: the caller reports it
    return false;
  }
  auto decode = [&a](float* bp, const Depth& d, int64_t c0, int64_t nc) {
    const int64_t kc = d.rows(), whole = nc / kW * kW;
    for (int64_t j = 0; j < kc; ++j) {
      const int64_t r = d.start[0] + j;
      const uint8_t* p = a.codes + r * a.n;
      const float* s = a.scales + (a.nb == 1 ? 0 : r / a.block) * a.n;
      float* row = bp + j * kGemmCols;
      for (int64_t q = 0; q < whole; q += kW)
        VStore(row + PanelAt(q, kc), VMul(D::Vec(p + c0 + q), VLoadU(s + c0 + q)));
      GemmPanelTail(row, kc, c0, nc, [&](int64_t c) { return D::One(p[c]) * s[c]; });
    }
  };
  return Gemm(pool, a.x, a.k, a.y, a.m, a.n, threads, depths, decode);
}

// -- dequantisation: codes to float32 weights (value * scale), for dequantise-then-dot at
// large M, where XLA's dot of the float32 weight beats any decode-as-you-go kernel. The
// same decoders as the matmuls, one multiply per weight, exactly as `astype(float32) *
// scale` rounds. Each thread writes its columns of every row.
struct ArgsDeq {
  const uint8_t* codes;  // [R, N] (4-bit: two logical rows a byte row) or [K, N]
  const float* scales;   // [nb, N]
  const float* table;    // [16] (4-bit only)
  float* w;              // [K, N]
  int64_t r, n, nb, block;
};

template <typename T>
bool Packed4Dequantize(const ArgsDeq& a, int64_t n0, int64_t n1) {
  const T t(a.table);
  for (int64_t r = 0; r < a.r; ++r) {
    const uint8_t* p = a.codes + r * a.n;
    const float* s_lo = a.scales + (a.nb == 1 ? 0 : r / a.block) * a.n;
    const float* s_hi = a.scales + (a.nb == 1 ? 0 : (r + a.r) / a.block) * a.n;
    float* lo = a.w + r * a.n;
    float* hi = a.w + (r + a.r) * a.n;
    int64_t c = n0;
    for (; c + kW <= n1; c += kW) {
      VF vl, vh;
      t.Nibbles(p + c, &vl, &vh);
      VStoreU(lo + c, VMul(vl, VLoadU(s_lo + c)));
      VStoreU(hi + c, VMul(vh, VLoadU(s_hi + c)));
    }
    for (; c < n1; ++c) {
      lo[c] = a.table[p[c] & 15] * s_lo[c];
      hi[c] = a.table[p[c] >> 4] * s_hi[c];
    }
  }
  return true;
}

template <typename D>
bool BytesDequantize(const ArgsDeq& a, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < a.r; ++r) {
    const uint8_t* p = a.codes + r * a.n;
    const float* s = a.scales + (a.nb == 1 ? 0 : r / a.block) * a.n;
    float* w = a.w + r * a.n;
    int64_t c = n0;
    for (; c + kW <= n1; c += kW) VStoreU(w + c, VMul(D::Vec(p + c), VLoadU(s + c)));
    for (; c < n1; ++c) w[c] = D::One(p[c]) * s[c];
  }
  return true;
}

// Whether a 4-bit table is int4's (0..7, -8..-1: the nibble as two's complement), which
// NibbleInts decodes without it, to the same values.
bool TwosComplement(const float* t) {
  for (int i = 0; i < 16; ++i)
    if (t[i] != static_cast<float>(i < 8 ? i : i - 16)) return false;
  return true;
}

const char kNoMemory[] = "could not allocate the kernel's partial-sum buffers";

ffi::Error Packed4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> table,
                       ffi::ResultBuffer<ffi::F32> y, int64_t block_size, int64_t threads,
                       int64_t k) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || table.element_count() != 16)
    return ffi::Error::InvalidArgument("qkern_packed4_gemv: expected x[M, K], codes[K/2, N], "
                                       "scales[nb, N] and a 16-entry table");
  Args4 a{x.typed_data(), codes.typed_data(), scales.typed_data(), table.typed_data(),
          y->typed_data(), xd[0], cd[0], cd[1], sd[0], block_size, k, xd[1]};
  // x is [M, 2R], zeros past k; from kGemmFrom rows it may also be [M, k] (the GEMM reads
  // only logical rows: padding x cost a copy of it, a third of a 384 x 384 GEMM at M = 1024)
  const bool x_ok = xd[1] == 2 * a.r || (a.m >= kGemmFrom && xd[1] == k);
  if (!x_ok || sd[1] != a.n || k < 1 || k > 2 * a.r ||
      (a.nb != 1 && (a.nb * a.block != 2 * a.r || a.nb % 2 != 0)))
    return ffi::Error::InvalidArgument("qkern_packed4_gemv: inconsistent shapes");
  const bool ints = TwosComplement(a.table);
  auto work = [&a, ints](int64_t n0, int64_t n1) {
    return ints ? Packed4Columns<NibbleInts>(a, n0, n1) : Packed4Columns<Table16>(a, n0, n1);
  };
  const bool ok = a.m < kGemmFrom ? OverColumns(pool, a.n, threads, work)
                  : ints          ? Packed4Gemm<NibbleInts>(pool, a, threads)
                                  : Packed4Gemm<Table16>(pool, a, threads);
  if (!ok)
    return ffi::Error::Internal(std::string("qkern_packed4_gemv: ") + kNoMemory);
  return ffi::Error::Success();
}

// One-byte codes: int8 (`kind` 0), float8_e4m3fn (1) or float8_e5m2 (2).
// Runs f on the decoder of one-byte code kind `kind`: int8 (0), float8_e4m3fn (1) or
// float8_e5m2 (2); nullopt for any other kind.
template <typename F>
std::optional<bool> WithByteCodes(int64_t kind, F f) {
  switch (kind) {
    case 0: return f(Int8Codes{});
    case 1: return f(E4M3Codes{});
    case 2: return f(E5M2Codes{});
    default: return std::nullopt;
  }
}

// fp8 codes as qkern stores them, uint8 bit patterns of the float8 named by `fp8_kind`
// (1: float8_e4m3fn, 2: float8_e5m2), or as float8 arrays of that type (QArrays built
// before codes were stored as bytes), read as bytes either way: converting one to the
// other would cost XLA a copy of the weight (a bitcast-convert fusion) per call.
ffi::Error CheckFp8Codes(const std::string& name, const ffi::AnyBuffer& codes,
                         int64_t fp8_kind) {
  const ffi::DataType t = codes.element_type();
  if (fp8_kind != 1 && fp8_kind != 2)
    return ffi::Error::InvalidArgument(name + ": fp8_kind must be 1 (e4m3fn) or 2 (e5m2)");
  if (!(t == ffi::DataType::U8 || (t == ffi::DataType::F8E4M3FN && fp8_kind == 1) ||
        (t == ffi::DataType::F8E5M2 && fp8_kind == 2)))
    return ffi::Error::InvalidArgument(
        name + ": codes must be uint8 bit patterns or the float8 type fp8_kind names");
  return ffi::Error::Success();
}

ffi::Error BytesImpl(ffi::ThreadPool& pool, const char* name, int64_t kind, const float* xp, const uint8_t* codes,
                     ffi::Span<const int64_t> xd, ffi::Span<const int64_t> cd,
                     ffi::Buffer<ffi::F32>& scales, ffi::ResultBuffer<ffi::F32>& y,
                     int64_t block_size, int64_t threads) {
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": expected x[M, K], codes[K, N], scales[nb, N]");
  Args8 a{xp, codes, scales.typed_data(), y->typed_data(), xd[0], cd[0], cd[1], sd[0],
          block_size};
  if (xd[1] != a.k || sd[1] != a.n || (a.nb != 1 && a.nb * a.block != a.k))
    return ffi::Error::InvalidArgument(std::string(name) + ": inconsistent shapes");
  const std::optional<bool> ok = WithByteCodes(kind, [&](auto codes) {
    using D = decltype(codes);
    if (a.m >= kGemmFrom) return BytesGemm<D>(pool, a, threads);
    return OverColumns(pool, a.n, threads, [&a](int64_t n0, int64_t n1) {
      return BytesColumns<D>(a, n0, n1); });
  });
  if (!ok) return ffi::Error::InvalidArgument(std::string(name) + ": unknown code kind");
  if (!*ok) return ffi::Error::Internal(std::string(name) + ": " + kNoMemory);
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                    ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y,
                    int64_t block_size, int64_t threads) {
  return BytesImpl(pool, "qkern_int8_gemv", 0, x.typed_data(),
                   reinterpret_cast<const uint8_t*>(codes.typed_data()), x.dimensions(),
                   codes.dimensions(), scales, y, block_size, threads);
}

// fp8 codes: see CheckFp8Codes.
ffi::Error Fp8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                   ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y,
                   int64_t block_size, int64_t threads, int64_t fp8_kind) {
  if (ffi::Error e = CheckFp8Codes("qkern_fp8_gemv", codes, fp8_kind); e.failure()) return e;
  return BytesImpl(pool, "qkern_fp8_gemv", fp8_kind, x.typed_data(),
                   static_cast<const uint8_t*>(codes.untyped_data()), x.dimensions(),
                   codes.dimensions(), scales, y, block_size, threads);
}

// Dequantisation: codes and scales [nb, N] -> w float32 [K, N]. The handlers' first
// operand (`after`, the x of the dot that uses w) is never read: it only orders the call
// after that x exists, so that XLA decodes each layer's weight just before its dot.
// `kind`: 4 (4-bit, with the 16-entry table), or a one-byte kind of WithByteCodes.
ffi::Error DequantizeImpl(ffi::ThreadPool& pool, const char* name, int64_t kind,
                          const uint8_t* codes, ffi::Span<const int64_t> cd,
                          ffi::Buffer<ffi::F32>& scales, const float* table,
                          ffi::ResultBuffer<ffi::F32>& w, int64_t block_size, int64_t threads) {
  const auto sd = scales.dimensions(), wd = w->dimensions();
  if (cd.size() != 2 || sd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument(std::string(name) + ": expected codes[R, N], "
                                       "scales[nb, N] and w[K, N]");
  ArgsDeq a{codes, scales.typed_data(), table, w->typed_data(), cd[0], cd[1], sd[0],
            block_size};
  const int64_t k = kind == 4 ? 2 * a.r : a.r;
  if (wd[0] != k || wd[1] != a.n || sd[1] != a.n ||
      (a.nb != 1 && (a.block <= 0 || a.nb * a.block != k)))
    return ffi::Error::InvalidArgument(std::string(name) + ": inconsistent shapes");
  std::optional<bool> ok;
  if (kind == 4) {
    const bool ints = TwosComplement(table);
    ok = OverColumns(pool, a.n, threads, [&a, ints](int64_t n0, int64_t n1) {
      return ints ? Packed4Dequantize<NibbleInts>(a, n0, n1)
                  : Packed4Dequantize<Table16>(a, n0, n1); });
  } else {
    ok = WithByteCodes(kind, [&](auto codes) {
      using D = decltype(codes);
      return OverColumns(pool, a.n, threads, [&a](int64_t n0, int64_t n1) {
        return BytesDequantize<D>(a, n0, n1); });
    });
  }
  if (!ok) return ffi::Error::InvalidArgument(std::string(name) + ": unknown code kind");
  if (!*ok) return ffi::Error::Internal(std::string(name) + ": failed");
  return ffi::Error::Success();
}

ffi::Error Packed4DequantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer, ffi::Buffer<ffi::U8> codes,
                                 ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> table,
                                 ffi::ResultBuffer<ffi::F32> w, int64_t block_size,
                                 int64_t threads) {
  if (table.element_count() != 16)
    return ffi::Error::InvalidArgument("qkern_packed4_dequantize: a 16-entry table");
  return DequantizeImpl(pool, "qkern_packed4_dequantize", 4, codes.typed_data(),
                        codes.dimensions(), scales, table.typed_data(), w, block_size,
                        threads);
}

ffi::Error Int8DequantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer, ffi::Buffer<ffi::S8> codes,
                              ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> w,
                              int64_t block_size, int64_t threads) {
  return DequantizeImpl(pool, "qkern_int8_dequantize", 0,
                        reinterpret_cast<const uint8_t*>(codes.typed_data()),
                        codes.dimensions(), scales, nullptr, w, block_size, threads);
}

ffi::Error Fp8DequantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer, ffi::AnyBuffer codes,
                             ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> w,
                             int64_t block_size, int64_t threads, int64_t fp8_kind) {
  if (ffi::Error e = CheckFp8Codes("qkern_fp8_dequantize", codes, fp8_kind); e.failure())
    return e;
  return DequantizeImpl(pool, "qkern_fp8_dequantize", fp8_kind,
                        static_cast<const uint8_t*>(codes.untyped_data()), codes.dimensions(),
                        scales, nullptr, w, block_size, threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernPacked4Gemv, Packed4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernInt8Gemv, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernFp8Gemv, Fp8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("fp8_kind"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernPacked4Dequantize, Packed4DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // `after`: read by no one
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernInt8Dequantize, Int8DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // `after`: read by no one
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkernFp8Dequantize, Fp8DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // `after`: read by no one
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("fp8_kind"));

#if defined(QKERN_AVX512)
#define QKERN_VARIANT "avx512"
#else
#define QKERN_VARIANT "avx2"
#endif

// The variant this library was built as (_build.py checks it matches the file it loaded).
extern "C" const char* qkern_native_variant() { return QKERN_VARIANT; }

// Whether this CPU (and its OS) runs this variant: cpuid, through the compiler's runtime.
extern "C" int qkern_native_supported() {
  __builtin_cpu_init();
  int ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#if defined(QKERN_AVX512)
  ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
       __builtin_cpu_supports("avx512vl");
#endif
  return ok;
}
