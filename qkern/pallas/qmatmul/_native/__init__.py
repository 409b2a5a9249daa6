"""Native CPU kernels for the `xla` backend, called through the XLA FFI: at small M (decode)
and, with AVX-512 and float32 x, from M = 49 as a blocked GEMM (see `max_m`).

At M = 1 every way of writing a 4-bit codebook lookup in XLA lowers to an AVX2 gather at
about a cycle per weight (bench/nf4_lookup.py), which kept nf4 below the dense matmul.
qgemv.cc decodes codes in registers instead (a 16-entry table in two registers, `vpermps`
and a blend; int8 widened and converted) and never writes a decoded weight. It covers the
4-bit formats (int4, nf4, fp4, mxfp4), the one-byte integer formats (int8 and the
emulated int1/2/3/5/6/7) and the fp8 formats (fp8_e4m3, fp8_e5m2, mxfp8: bit patterns turned
into float16 ones and converted by F16C, decoding exactly as `astype(float32)` does,
subnormals and NaN/inf codes included), with per-block or per-channel scales and minmax
zero points.

`qmatmul_small_m(x2, op, config)` runs it when `eligible(x2, op)`; the library is built on
first use (_build.py), in the best instruction-set variant the CPU runs (`avx2`, `avx512`;
`$QKERN_NATIVE_ISA` caps it). The variant is read when a function is traced (a primitive
parameter naming its FFI targets), so a function jitted earlier keeps its variant. It is
bound as a primitive whose lowering picks the kernel or the scan (`qmatmul/_xla.py`'s
`_scan_matmul`):
- the kernel only when lowering for CPU, for one device, outside `jax.export`: GPU and
  TPU lowerings, SPMD programs over several devices (whose partitioner would gather an
  opaque custom call's operands onto every device) and exported functions (which may only
  hold custom calls with compatibility guarantees) get the scan;
- under `vmap` its batching rule folds a batch of x into M while M stays within
  `max_m(op)`; a batched weight, or a batch that makes M larger, runs the scan;
- an Explicit mesh or `shard_map` (`eligible` is False) never binds it.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from ...._compat import _vma, explicit_sharding, lowering_is_local, not_mapped
from ....formats import FORMATS, get_format
from ..._config import MatmulConfig
from ..._decode import nibble_table
from ..._operand import QOperand, pad_k, reference_dequantize
from ._build import ENV_VAR, ISA_VAR, VARIANTS, library, status, target, variant

__all__ = ["ENV_VAR", "ISA_VAR", "VARIANTS", "dequantize", "eligible", "max_m",
           "qmatmul_small_m", "runs_for", "status", "variant"]


SMALL_FP8_CODES = 1 << 22   # 4 Mi codes: the AVX2 fp8 kernel's larger max_m below this
GEMM_FROM = 49              # qgemv.cc's kGemmFrom: the blocked GEMM from this many rows
TILED_MAX_M = 48            # the register-tiled kernel's last M (AVX-512)


def max_m(op, isa: str | None = None, x_dtype=jnp.float32) -> int:
    """Rows of x at or below which the kernel runs for `op` and x of `x_dtype`, by variant
    (`isa`; default: the one loaded now). Below 8 rows the kernel streams the weight; from 8 it is register-tiled (qgemv.cc:
    each code decoded once for up to 16 rows of x on AVX-512, 8 on AVX2); from GEMM_FROM
    (AVX-512) a blocked GEMM decodes each block of the weight once into a panel that all
    rows use.
    - AVX-512, float32 (or float16) x: every M. The tiled kernel beat the scan to M = 48 for
      every format at K = N = 4096 and at MiniLM's 384 x 384, 384 x 1536 and 1536 x 384
      (`python bench/native_crossover.py`); above, the GEMM ran 0.8-2.0x of XLA's dense
      float32 dot at M = 64 on MiniLM's shapes where the scan ran 0.5-0.97x, 1.1-1.45x at
      K = N = 4096, M = 64, and 1.0-1.13x at M = 512, against 0.77-0.95x (`python
      bench/native_gemm.py`, docs/benchmarks.md). (Small weights from M = 128 are
      dequantised first by the heuristic, `_config.heuristic_config`, before this is asked.)
    - bfloat16 x (`compute_dtype="bfloat16"`): to M = 48. Above, XLA's bfloat16 dot (which
      AMX runs) beats any float32 kernel: the scan or dequantise-then-dot in bfloat16.
    - AVX2: to M = 48 for the integer and 4-bit formats, where it beat the scan (measured
      capped on the same CPU, where the scan still ran XLA's AVX-512 code: an AVX2-only
      CPU's scan is slower still). fp8 did not past M = 16 at K = N = 4096 (0.9-1.2x
      against 1.2-1.7x), but did to M = 32 at MiniLM's shapes: fp8 runs to 32 for weights
      of at most `SMALL_FP8_CODES` codes with AVX2, to 16 above. The AVX2 build has the
      GEMM too (tests run it), unmeasured on an AVX2-only CPU, so not chosen there."""
    if (isa or variant() or "").startswith("avx512"):
        return TILED_MAX_M if jnp.dtype(x_dtype) == jnp.bfloat16 else sys.maxsize
    if op.fmt.byte_floats:
        return 32 if op.k * op.n <= SMALL_FP8_CODES else 16
    return TILED_MAX_M


def _table(fmt) -> np.ndarray:
    """The 16 float32 values of a 4-bit code."""
    if fmt.kind == "int":      # two's complement nibbles
        return np.r_[0:8, -8:0].astype(np.float32)
    return nibble_table(fmt)


def _kernel_for(op) -> str | None:
    fmt = op.fmt
    if FORMATS.get(fmt.name) is not fmt:  # the primitive carries the format by its name
        return None
    if fmt.packed and op.data.dtype == jnp.uint8 and fmt.kind in ("int", "codebook", "mx"):
        return "qkern_packed4_gemv" if op.halves_aligned else None
    if not fmt.packed and fmt.kind == "int" and op.data.dtype == jnp.int8:
        return "qkern_int8_gemv"
    if fmt.byte_floats and op.data.dtype in _FP8 + (jnp.dtype(jnp.uint8),):
        return "qkern_fp8_gemv"
    return None


# fp8 code dtypes the kernel reads besides uint8 bit patterns (how qkern stores them; float8
# arrays come from QArrays built before that)
_FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
# qkern_fp8_gemv's `fp8_kind` attribute: which float8 the bytes hold
_FP8_KIND = {jnp.dtype(jnp.float8_e4m3fn): 1, jnp.dtype(jnp.float8_e5m2): 2}


def runs_for(m: int, op, x_dtype=jnp.float32) -> bool:
    """Whether an unsharded x[m, K] @ op, x of `x_dtype`, runs the native kernel on this
    machine."""
    return (0 < m <= max_m(op, x_dtype=x_dtype) and _kernel_for(op) is not None
            and library() is not None)


def eligible(x2: jax.Array, op) -> bool:
    """Whether `x2 @ op` can run the native kernel (decided at trace time)."""
    if x2.ndim != 2 or not runs_for(x2.shape[0], op, x2.dtype):
        return False
    return _unsharded(x2, op.data, op.scales, op.zeros)


def _unsharded(*arrays) -> bool:
    """No array (None skipped) on an Explicit mesh or varying inside shard_map."""
    return not any(explicit_sharding(a) is not None or _vma(a)
                   for a in arrays if a is not None)


# Threads per call: one per core, at most MAX_THREADS, only for calls with at least
# MIN_WORK codes times rows of x, and each at least MIN_COLUMNS columns wide while the call
# streams its weight (M < 8: narrower slices of each code row stream badly; 256-column
# panels ran 1.5-2x slower than 2048 on one core), NARROW_COLUMNS once it computes. The
# threads are XLA's own intra-op pool (the kernel hands it tasks), so a call starts none.
# Inside a model the pool's threads are awake and a second one pays from small calls on:
# all-MiniLM-L6-v2 at batch 1 (M = 32; 384 x 384, 384 x 1536, 1536 x 384 weights) ran
# 1.23-1.55x faster than with one thread (2-core Xeon VM). Alone and idle, their wake-up
# costs 20-40 us, more than a 384 x 384 call at M = 1 takes.
MIN_COLUMNS = 512
NARROW_COLUMNS = 128
MAX_THREADS = 16
MIN_WORK = 1 << 20


def _threads(op, m: int = 1) -> int:
    if op.data.size * max(m, 1) < MIN_WORK:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    if m >= GEMM_FROM:   # the GEMM splits rows (m >= n) or columns, in whole micro tiles
        return max(1, min(cpus, MAX_THREADS))
    width = MIN_COLUMNS if m < 8 else NARROW_COLUMNS
    return max(1, min(cpus, op.n // width, MAX_THREADS))


def _weight_operands(op, kernel: str, threads: int) -> tuple[tuple, dict]:
    """(operands, attributes) that kernel `kernel` (a gemv or a dequantise target) takes for
    the weight: codes as stored (uint8 bit patterns, or float8 arrays: a bitcast would be a
    copy), float32 scales, the 16-entry table of 4-bit codes, which float8 fp8 codes hold."""
    args = (op.data, op.scales.astype(jnp.float32))
    attrs = dict(block_size=np.int64(op.block_size), threads=np.int64(threads))
    if kernel.startswith("qkern_packed4_"):
        args += (jnp.asarray(_table(op.fmt)),)
    if kernel == "qkern_packed4_gemv":      # logical rows: it skips a high half of padding
        attrs["k"] = np.int64(op.k)
    if kernel.startswith("qkern_fp8_"):
        attrs["fp8_kind"] = np.int64(_FP8_KIND[jnp.dtype(op.fmt.float_dtype)])
    return args, attrs


def _native(x2: jax.Array, op, isa: str | None = None) -> jax.Array:
    """float32 [M, N] from the FFI kernel of variant `isa` (default: the loaded one), zero
    points applied. A variant named must have been loaded in this process before (which
    registered its targets): the primitive names the one `eligible` loaded."""
    if isa is None:
        if library() is None:   # registers the FFI targets (normally done by `eligible`)
            raise RuntimeError(f"qkern's native CPU kernels are {status()}")
        isa = variant()
    m = x2.shape[0]
    x32 = x2.astype(jnp.float32)
    name = _kernel_for(op)
    # x padded to the stored rows, except for the 4-bit GEMM, which reads logical rows only
    # (the copy cost a third of a 384 x 384 int4 matmul at M = 1024)
    if not (name == "qkern_packed4_gemv" and m >= GEMM_FROM):
        x32 = pad_k(x32, op.k_padded)
    out = jax.ShapeDtypeStruct((m, op.n), jnp.float32)
    args, attrs = _weight_operands(op, name, _threads(op, m))
    y = jax.ffi.ffi_call(target(name, isa), out)(x32, *args, **attrs)
    if op.zeros is not None:  # sum_k x[k] (c - z) s = kernel - sum_b (sum of x over b) z s
        xsum = pad_k(x32, op.k_padded).reshape(m, op.num_blocks, -1).sum(-1)
        y = y - xsum @ (op.zeros.astype(jnp.float32) * op.scales.astype(jnp.float32))
    return y


# -- the primitive: x2 @ W with the choice of kernel or scan left to the lowering -------
# Operands: x2, data, scales[, zeros]; params: fmt (its name), block_size, k (the
# QOperand's static fields), block_k (the scan's config), isa (the kernel's variant) and
# int8_codes (W8A8's codes, below).
small_m_matmul_p = Primitive("qkern_small_m_matmul")


def _operand(data, scales, zeros, fmt, block_size, k):
    return QOperand(data, scales, zeros, get_format(fmt), block_size, k)


def _unpack(args, fmt, block_size, k):
    x2, data, scales, *zeros = args
    return x2, _operand(data, scales, zeros[0] if zeros else None, fmt, block_size, k)


# The K-chunked XLA scan (`qmatmul/_xla.py`'s `_scan_matmul`), registered by that module, which
# builds on this one: the lowering falls back to it wherever the native kernel cannot run.
SCAN: list = []
# W8A8 (`w8a8/_xla.py`) binds the primitive with int8_codes=True: x2 holds int8 codes as
# float32. Its fallback is then the int8 product (x2 back to int8, an int32 dot), registered
# by that module, and vmap folds a batch into M only below STREAMING_BELOW rows, where
# the kernel streams: it sums each block's products unscaled, so sums of small integers are
# exact (from there the register-tiled kernel scales each code first).
INT8_PRODUCT: list = []
STREAMING_BELOW = 8         # qgemv.cc's kTiledFrom


def _scan_fn(*args, fmt, block_size, k, block_k, isa, int8_codes):
    del isa
    x2, op = _unpack(args, fmt, block_size, k)
    fallback = INT8_PRODUCT[0] if int8_codes else SCAN[0]
    return fallback(x2, op, MatmulConfig(block_k=block_k))


def _native_fn(*args, fmt, block_size, k, block_k, isa, int8_codes):
    del block_k, int8_codes
    return _native(*_unpack(args, fmt, block_size, k), isa=isa)


def _abstract_eval(x2, data, *_, **__):
    return jax.core.ShapedArray((x2.shape[0], data.shape[1]), jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted_bind(**params):
    return jax.jit(functools.partial(small_m_matmul_p.bind, **params))


def _impl(*args, **params):  # eager calls: compile once per static configuration
    return _jitted_bind(**params)(*args)


def _lower_scan(ctx, *args, **params):
    return mlir.lower_fun(functools.partial(_scan_fn, **params), multiple_results=False)(
        ctx, *args)


def _lower_cpu(ctx, *args, **params):
    fn = _native_fn if lowering_is_local(ctx) else _scan_fn
    return mlir.lower_fun(functools.partial(fn, **params), multiple_results=False)(ctx, *args)


def _batch(args, dims, **params):
    x_dim, w_dims = dims[0], dims[1:]
    if x_dim is not not_mapped and all(d is not_mapped for d in w_dims):
        x = jnp.moveaxis(args[0], x_dim, 0)                         # [B, M, K]
        b, m, kk = x.shape
        op = _operand(args[1], args[2], args[3] if len(args) > 3 else None,
                      params["fmt"], params["block_size"], params["k"])
        limit = (STREAMING_BELOW - 1 if params["int8_codes"]
                 else max_m(op, params["isa"], x.dtype))
        if b * m <= limit:
            y = small_m_matmul_p.bind(x.reshape(b * m, kk), *args[1:], **params)
            return y.reshape(b, m, -1), 0
    axes = tuple(None if d is not_mapped else d for d in dims)
    return jax.vmap(functools.partial(_scan_fn, **params), in_axes=axes)(*args), 0


small_m_matmul_p.def_impl(_impl)
small_m_matmul_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(small_m_matmul_p, _lower_scan)
mlir.register_lowering(small_m_matmul_p, _lower_cpu, platform="cpu")
batching.primitive_batchers[small_m_matmul_p] = _batch


def qmatmul_small_m(x2: jax.Array, op, config, *, int8_codes: bool = False) -> jax.Array:
    """x2[M, K] @ W as float32 [M, N]: the native kernel where the lowering allows it, the
    scan with `config` elsewhere (see the module docstring). Call it when `eligible`.
    int8_codes=True (W8A8): x2 holds int8 codes as float32; the fallback is the int8
    product, and vmap folds into M only below STREAMING_BELOW rows (see INT8_PRODUCT)."""
    zeros = () if op.zeros is None else (op.zeros,)
    return small_m_matmul_p.bind(x2, op.data, op.scales, *zeros, fmt=op.fmt.name,
                                 block_size=op.block_size, k=op.k, block_k=config.block_k,
                                 isa=variant(), int8_codes=bool(int8_codes))


# -- dequantisation: the weight as float32, for dequantise-then-dot at large M -----------
# XLA's own decode of a whole weight costs more than the dot's share of it (a 4-bit lookup
# is a gather, fp8 a chain of bit operations): all-MiniLM-L6-v2's 36 kernels took 4 ms
# (int8), 6 ms (nf4) and 8 ms (fp8_e4m3) against a 92 ms float32 batch of 32. The same
# decoders as the kernels write value * scale with XLA's intra-op threads. Bound as a
# primitive whose lowering picks the kernel (CPU, one device, outside jax.export) or
# `reference_dequantize` (everywhere else); a batched (stacked) weight under vmap takes
# the reference too.
_DEQUANTIZE = {"qkern_packed4_gemv": "qkern_packed4_dequantize",
               "qkern_int8_gemv": "qkern_int8_dequantize",
               "qkern_fp8_gemv": "qkern_fp8_dequantize"}
dequantize_p = Primitive("qkern_native_dequantize")


def dequantize_eligible(op) -> bool:
    """Whether `dequantize(op)` can run the native kernel (decided at trace time): a format
    the kernels take, no zero points, an unsharded weight, the library loaded."""
    if op.zeros is not None or _kernel_for(op) is None or library() is None:
        return False
    return _unsharded(op.data, op.scales)


def _dequantize_reference(after, data, scales, *, fmt, block_size, k, isa):
    del after, isa
    return reference_dequantize(_operand(data, scales, None, fmt, block_size, k))


def _dequantize_native(after, data, scales, *, fmt, block_size, k, isa):
    op = _operand(data, scales, None, fmt, block_size, k)
    name = _DEQUANTIZE[_kernel_for(op)]
    out = jax.ShapeDtypeStruct((op.k_padded, op.n), jnp.float32)
    args, attrs = _weight_operands(op, name, _threads(op, 8))
    w = jax.ffi.ffi_call(target(name, isa), out)(after, *args, **attrs)
    return w[:k]


def _dequantize_abstract(after, data, scales, *, fmt, block_size, k, isa):
    return jax.core.ShapedArray((k, data.shape[1]), jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted_dequantize(**params):
    return jax.jit(functools.partial(dequantize_p.bind, **params))


def _dequantize_lower_cpu(ctx, *args, **params):
    fn = _dequantize_native if lowering_is_local(ctx) else _dequantize_reference
    return mlir.lower_fun(functools.partial(fn, **params), multiple_results=False)(ctx, *args)


def _dequantize_batch(args, dims, **params):
    if all(d is not_mapped for d in dims[1:]):   # only `after` batched: one weight still
        after = jnp.take(args[0], 0, axis=dims[0])
        return dequantize_p.bind(after, *args[1:], **params), not_mapped
    axes = tuple(None if d is not_mapped else d for d in dims)
    return jax.vmap(functools.partial(_dequantize_reference, **params), in_axes=axes)(*args), 0


dequantize_p.def_impl(lambda *args, **params: _jitted_dequantize(**params)(*args))
dequantize_p.def_abstract_eval(_dequantize_abstract)
mlir.register_lowering(dequantize_p, mlir.lower_fun(_dequantize_reference,
                                                    multiple_results=False))
mlir.register_lowering(dequantize_p, _dequantize_lower_cpu, platform="cpu")
batching.primitive_batchers[dequantize_p] = _dequantize_batch


def dequantize(op, after: jax.Array | None = None) -> jax.Array:
    """float32 [K, N] = the QOperand's weight, by the native kernel where the lowering
    allows (see above). Call it when `dequantize_eligible(op)`. `after` (the x of the dot
    the weight is for) is read by no one: the kernel's call takes it as an operand only so
    that XLA runs the decode after x exists, just before its dot. Left free, XLA:CPU
    schedules every layer's decode at the start of the program (an optimization_barrier
    does not stop it), and the decoded weights of a whole model, live at once, made
    all-MiniLM-L6-v2's temporary buffer 55 MB against float32's 17 MB: over glibc's 32 MB
    mmap threshold, so mapped afresh, page faults and all, on every call (106 ms against
    94 ms float32 at batch 32)."""
    after = jnp.zeros((), jnp.float32) if after is None else after
    return dequantize_p.bind(after, op.data, op.scales, fmt=op.fmt.name,
                             block_size=op.block_size, k=op.k, isa=variant())
