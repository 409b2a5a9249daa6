"""Native CPU kernels for the `xla` backend at small M (decode), called through the XLA FFI.

At M = 1 every way of writing a 4-bit codebook lookup in XLA lowers to an AVX2 gather at
about a cycle per weight (bench/nf4_lookup.py), which kept nf4 below the dense matmul.
qgemv.cc decodes codes in registers instead (a 16-entry table in two registers, `vpermps`
and a blend; int8 widened and converted) and never writes a decoded weight. It covers the
4-bit formats (int4, nf4, fp4, mxfp4) and the one-byte integer formats (int8 and the
emulated int2/3/5/6/7), with per-block or per-channel scales and minmax zero points.

`qmatmul_small_m(x2, op, fallback)` runs it when `eligible(x2, op)`; the library is built on
first use (_build.py). Where it cannot run, the scan (`fallback`) does:
- on any platform but CPU (`lax.platform_dependent` picks at lowering, so an exported
  function still lowers for GPU or TPU);
- under `vmap` when the weight itself is batched or the batch makes M larger than
  `max_m(op)` (a custom batching rule folds a batch of x into M while M stays small);
- on an Explicit mesh or inside `shard_map` (the kernel knows nothing of shardings).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ..._compat import _vma, explicit_sharding
from ._build import ENV_VAR, library, status

__all__ = ["ENV_VAR", "eligible", "max_m", "qmatmul_small_m", "runs_for", "status"]


def max_m(op) -> int:
    """Rows of x at or below which the kernel runs for `op`. It decodes each code once for
    up to four rows of x, so its time grows with M faster than the scan's. Measured on a
    2-core EPYC (K = N = 4096, `python bench/native_crossover.py`, docs/benchmarks.md): it
    beats the scan up to M = 8 for every format it takes; at M = 16 it still beats it for
    the lookup formats (nf4, fp4, mxfp4: the scan's lookup is a gather) and not for int4
    and int8."""
    return 16 if op.fmt.kind in ("codebook", "mx") else 8


def _table(fmt) -> np.ndarray:
    """The 16 float32 values of a 4-bit code."""
    if fmt.kind == "int":      # two's complement nibbles
        return np.r_[0:8, -8:0].astype(np.float32)
    from .._xla_qmatmul import _nibble_table

    return _nibble_table(fmt)


def _kernel_for(op) -> str | None:
    fmt = op.fmt
    if fmt.packed and op.data.dtype == jnp.uint8 and fmt.kind in ("int", "codebook", "mx"):
        return "qkern_packed4_gemv" if op.halves_aligned else None
    if not fmt.packed and fmt.kind == "int" and op.data.dtype == jnp.int8:
        return "qkern_int8_gemv"
    return None


def runs_for(m: int, op) -> bool:
    """Whether an unsharded x[m, K] @ op runs the native kernel on this machine."""
    return 0 < m <= max_m(op) and _kernel_for(op) is not None and library() is not None


def eligible(x2: jax.Array, op) -> bool:
    """Whether `x2 @ op` can run the native kernel (decided at trace time)."""
    if x2.ndim != 2 or not runs_for(x2.shape[0], op):
        return False
    arrays = [x2, op.data, op.scales] + ([op.zeros] if op.zeros is not None else [])
    return not any(explicit_sharding(a) is not None or _vma(a) for a in arrays)


# Threads per call: one per core, but each at least MIN_COLUMNS columns wide (narrower
# slices of each code row stream badly: 256-column panels ran 1.5-2x slower than 2048 on
# one core) and at most MAX_THREADS (a GEMV is memory bound long before that; threads
# are started per call). Only 2 cores have been measured.
MIN_COLUMNS = 512
MAX_THREADS = 16


def _threads(op) -> int:
    if op.data.size < (1 << 20):  # under ~1M codes a second thread costs more than it saves
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, op.n // MIN_COLUMNS, MAX_THREADS))


def _native(x2: jax.Array, op) -> jax.Array:
    """float32 [M, N] from the FFI kernel, zero points applied."""
    if library() is None:   # registers the FFI targets (normally done by `eligible`)
        raise RuntimeError(f"qkern's native CPU kernels are {status()}")
    m = x2.shape[0]
    x32 = x2.astype(jnp.float32)
    if op.k_padded != op.k:
        x32 = jnp.pad(x32, ((0, 0), (0, op.k_padded - op.k)))
    target = _kernel_for(op)
    out = jax.ShapeDtypeStruct((m, op.n), jnp.float32)
    attrs = dict(block_size=np.int64(op.block_size), threads=np.int64(_threads(op)))
    args = (x32, op.data, op.scales.astype(jnp.float32))
    if target == "qkern_packed4_gemv":
        args += (jnp.asarray(_table(op.fmt)),)
    y = jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args, **attrs)
    if op.zeros is not None:  # sum_k x[k] (c - z) s = kernel - sum_b (sum of x over b) z s
        xsum = x32.reshape(m, op.num_blocks, -1).sum(-1)
        y = y - xsum @ (op.zeros.astype(jnp.float32) * op.scales.astype(jnp.float32))
    return y


def qmatmul_small_m(x2: jax.Array, op, fallback) -> jax.Array:
    """x2[M, K] @ W as float32 [M, N]: the native kernel on CPU, `fallback(x2, op)` (the
    scan, float32 [M, N]) elsewhere and for batches it does not suit."""

    @jax.custom_batching.custom_vmap
    def run(x2, op):
        return jax.lax.platform_dependent(x2, op, cpu=_native, default=fallback)

    @run.def_vmap
    def _batched(axis_size, in_batched, x2, op):
        x_b, op_b = in_batched
        if x_b and not any(jax.tree_util.tree_leaves(op_b)) and axis_size * x2.shape[1] <= max_m(op):
            m, k = x2.shape[1:]
            return qmatmul_small_m(x2.reshape(-1, k), op, fallback).reshape(axis_size, m, -1), True
        op_axes = jax.tree_util.tree_map(lambda b: 0 if b else None, op_b)
        y = jax.vmap(fallback, in_axes=(0 if x_b else None, op_axes))(x2, op)
        return y, True

    return run(x2, op)
