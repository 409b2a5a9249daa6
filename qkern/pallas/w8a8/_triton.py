"""W8A8 matmul for NVIDIA GPUs: int8 activations times an int8 weight, lowered through Triton.

    y = w8a8_triton(x, op)                    # x [M, K] float, op an int8 QOperand of W [K, N]
    y = w8a8_triton(x, op, act_scale=s)       # static per-tensor activation scale

    y[m, n] = sx[m] * sum_b sw[b, n] * sum_{k in b} xq[m, k] * wq[k, n]

Activation quantisation is a small XLA pre-pass (`quantize_activations` in w8a8/base.py),
not part of the kernel. Why: a dynamic per-row scale needs the absmax of the whole row
before any K tile can be rounded, and every N tile's program would recompute it; the
pre-pass does it once, writes int8 codes (1 byte per element instead of 2 or 4, so each
of the N / block_n programs that re-read x reads less), and gives every backend codes
bit-identical to the reference's. For decode x is 16 x K next to a K x N weight: the
pre-pass is noise. A static `act_scale` is the same pre-pass with a fixed scale.

The kernel reads the stored int8 codes as they are (no copy, pad or transpose of W) and
does int8 x int8 dots with int32 accumulation (`preferred_element_type=jnp.int32`, Triton's
IMMA path):

* per channel (one scale row): the whole K loop accumulates in int32, and the weight
  scale and the row scale multiply the [block_m, block_n] result once at the end. Exact
  up to the int32 range: |sum| <= 127 * 127 * K, so K up to 133,000.
* per block along K (blocks of B rows): each block's int32 dot is converted to float32,
  multiplied by its scale row and accumulated in float32. A K tile therefore never
  straddles a block: block_k is a multiple of B (block_k / B sub-steps) or a divisor.

Two launch shapes, one kernel body:

* decode (M <= 16): x padded to 16 rows (Triton's MMA needs M >= 16), one program per
  (N tile, K split). With split_k > 1 each program sums its own range of K tiles and the
  float32 partials are added outside (at M = 1, N / block_n programs alone are too few
  to fill a GPU).
* tiled (M > 16): one program per (M tile, N tile), looping over all K tiles.

Int8 MMA contracts 32 elements per instruction, so K sub-steps are at least 32 rows
(`_MIN_K`): an operand whose scale blocks are smaller is refused (use the xla backend).

Edges: x is zero-padded (rows to the M tile, columns to the K span); loads of codes and
scales past N or past the stored rows are masked (Triton's lowering does not mask block
accesses), stores past M and N are masked. A masked code reads as 0 and meets zero
activations, adding exactly 0.

The gradient for x uses the weight-only transposed kernel (qmatmul's), not this file.

Example:
    op = stored_operand(qkern.quantize(w, "int8"))
    y = w8a8_triton(x, op)                     # on an NVIDIA GPU
    y = w8a8_triton(x, op, interpret=True)     # anywhere (slow; for tests)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .. import _space
from .._config import DECODE_M, MatmulConfig, default_config
from .._operand import QOperand
from .._triton_common import (Tiling, checked_blocks, largest_pow2_divisor, masked_load,
                              next_pow2, register_pressure, smem_limit, split_work,
                              tile_mask)
from ..qmatmul import _triton as qmatmul_triton
from ..qmatmul.base import check_activation
from .base import check_act_scale, check_w8a8_operand, quantize_activations

__all__ = ["w8a8_triton", "plan_triton_w8a8"]

_MIN_MN = 16             # smallest M and N of a Triton dot
_MIN_K = 32              # smallest K of an int8 dot (one IMMA k-step)


@dataclasses.dataclass(frozen=True)
class _Plan(Tiling):
    m: int                # rows of x
    kp: int               # stored rows of the weight (K padded to whole blocks)
    n: int
    nb: int               # scale rows (1: per channel)
    block_size: int

    @property
    def per_channel(self) -> bool:
        return self.nb == 1

    @property
    def span(self) -> int:
        """Columns of the padded x: every K step of every split."""
        return self.split * self.steps * self.bk

    @property
    def decode(self) -> bool:
        return self.m <= DECODE_M


def plan_triton_w8a8(op: QOperand, m: int, config: MatmulConfig | None = None) -> _Plan:
    """The validated, clamped tiling `w8a8_triton` uses for M rows.

    An explicit config is checked strictly (powers of two; block_k a multiple or a divisor
    of the block size B when the weight has per-block scales); blocks larger than the
    problem are then shrunk, which changes no result. None starts from
    `default_config("triton", m)` and picks a block_k that fits B.
    """
    check_w8a8_operand(op)
    b, nb = op.block_size, op.num_blocks
    kp, n = op.data.shape
    cfg, _, bm, bn, bk = checked_blocks(config, b, nb, "int8 weight",
                                        default_config("triton", m))
    bn = max(_MIN_MN, min(bn, next_pow2(n)))
    bk = max(_MIN_K, min(bk, next_pow2(kp)))
    bm = _MIN_MN if m <= DECODE_M else max(_MIN_MN, min(bm, next_pow2(m)))
    sub = bk if nb == 1 else min(bk, b)
    if sub < _MIN_K or (nb > 1 and b % sub):
        raise ValueError(
            f"int8 weight with block_size {b}: the Triton W8A8 kernel needs scale blocks of "
            f"at least {_MIN_K} rows whose size is a multiple of a power-of-two K step "
            f"(one int8 dot per block); use the xla backend or requantise with blocks of "
            f"32, 64, 128, ...")
    total = pl.cdiv(kp, bk)
    steps, split = split_work(total, cfg.split_k if m <= DECODE_M else 1)
    return _Plan(m=m, kp=kp, n=n, nb=nb, block_size=b, bm=bm, bn=bn, bk=bk, sub=sub,
                 steps=steps, split=split, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)


# --------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------


def _w8a8_kernel(xq_ref, sx_ref, d_ref, s_ref, o_ref, *, p: _Plan):
    """One [bm, bn] output tile over this program's K steps.

    Grid: decode (N tiles, K splits), tiled (M tiles, N tiles). xq_ref: [bm, span] int8
    (zero-padded), sx_ref: [bm, 1] float32 row scales, d_ref: [kp, bn] int8 codes of this
    N tile, s_ref: [nb, bn] float32 weight scales.
    """
    if p.decode:
        i, j, sp = 0, pl.program_id(0), pl.program_id(1)
    else:
        i, j, sp = pl.program_id(0), pl.program_id(1), 0
    cols = j * p.bn + jnp.arange(p.bn, dtype=jnp.int32)
    col_ok = cols < p.n
    cols_ok = p.n % p.bn == 0                       # static: no column masks needed
    rows_ok = p.span == p.kp                        # static: no K step overhangs
    ri = jnp.arange(p.sub, dtype=jnp.int32)

    def scale_row(blk):
        mask = None if cols_ok else col_ok[None, :]
        return masked_load(s_ref.at[pl.ds(blk, 1), :], mask, s_ref.dtype)   # [1, bn]

    def body(t, acc):
        row0 = (sp * p.steps + t) * p.bk
        for q in range(p.subs):
            r0 = pl.multiple_of(row0 + q * p.sub, p.sub)
            mask = tile_mask(None if rows_ok else r0 + ri, p.kp, None if cols_ok else cols, p.n)
            if mask is not None:
                mask = jnp.broadcast_to(mask, (p.sub, p.bn))
            w = masked_load(d_ref.at[pl.ds(r0, p.sub), :], mask, d_ref.dtype)
            xt = xq_ref[:, pl.ds(r0, p.sub)]
            part = jnp.dot(xt, w, preferred_element_type=jnp.int32)      # [bm, bn] int32
            if p.per_channel:
                acc = acc + part
            else:
                # clamped: a step past the stored rows (zero codes, zero x) still reads a
                # real, finite scale row
                blk = jnp.minimum(lax.div(r0, p.block_size), p.nb - 1)
                acc = acc + part.astype(jnp.float32) * scale_row(blk)
        return acc

    acc_dtype = jnp.int32 if p.per_channel else jnp.float32
    acc = lax.fori_loop(0, p.steps, body, jnp.zeros((p.bm, p.bn), acc_dtype))
    y = acc.astype(jnp.float32)
    if p.per_channel:
        y = y * scale_row(0)
    y = y * sx_ref[...]
    rows = i * p.bm + jnp.arange(p.bm, dtype=jnp.int32)
    mask = (rows < p.m)[:, None] & col_ok[None, :]
    plgpu.store(o_ref.at[:, :], y.astype(o_ref.dtype), mask=mask)


def _launch(xq, sx, op: QOperand, p: _Plan, out_dtype, interpret):
    rows = pl.cdiv(p.m, p.bm) * p.bm
    xq = jnp.pad(xq, ((0, rows - p.m), (0, p.span - xq.shape[1])))
    sx = jnp.pad(sx, ((0, rows - p.m), (0, 0)))
    n_tiles = pl.cdiv(p.n, p.bn)
    if p.decode:
        grid = (n_tiles, p.split)
        x_index = lambda j, s: (0, 0)
        w_index = lambda j, s: (0, j)
        if p.split > 1:
            out_shape = jax.ShapeDtypeStruct((p.split, p.m, p.n), jnp.float32)
            out_spec = pl.BlockSpec((None, p.bm, p.bn), lambda j, s: (s, 0, j))
        else:
            out_shape = jax.ShapeDtypeStruct((p.m, p.n), out_dtype)
            out_spec = pl.BlockSpec((p.bm, p.bn), lambda j, s: (0, j))
        name = "w8a8_triton_decode"
    else:
        grid = (rows // p.bm, n_tiles)
        x_index = lambda i, j: (i, 0)
        w_index = lambda i, j: (0, j)
        out_shape = jax.ShapeDtypeStruct((p.m, p.n), out_dtype)
        out_spec = pl.BlockSpec((p.bm, p.bn), lambda i, j: (i, j))
        name = "w8a8_triton_tiled"
    out = pl.pallas_call(
        functools.partial(_w8a8_kernel, p=p),
        grid=grid,
        in_specs=[pl.BlockSpec((p.bm, p.span), x_index),
                  pl.BlockSpec((p.bm, 1), x_index),
                  pl.BlockSpec((p.kp, p.bn), w_index),
                  pl.BlockSpec((p.nb, p.bn), w_index)],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=p.num_warps,
                                             num_stages=p.num_stages),
        interpret=interpret,
        name=name,
    )(xq, sx, op.data, op.scales)
    if p.decode and p.split > 1:
        out = out.sum(axis=0).astype(out_dtype)
    return out


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _w8a8_triton(x, op, act_scale, config, interpret):
    p = plan_triton_w8a8(op, x.shape[0], config)
    xq, sx = quantize_activations(x, act_scale)
    return _launch(xq, sx, op, p, x.dtype, interpret)


def w8a8_triton(x: jax.Array, op: QOperand, config: MatmulConfig | None = None, *,
                act_scale=None, interpret: bool = False) -> jax.Array:
    """y[M, N] = x[M, K] @ W, x quantised to int8 (per row, or by the static scalar
    act_scale), W a symmetric int8 QOperand; int32 accumulation, result in x's dtype.

    config: block_m / block_n / block_k (stored rows per K step) / warps / stages /
    split_k (decode only); None takes `default_config("triton", M)` fitted to the problem.
    interpret=True runs the kernel in Pallas's interpreter (any device; for tests).

    Raises ValueError for a K mismatch, an unsupported dtype, a non-int8 or asymmetric
    weight, a non-scalar act_scale, or a config that breaks Triton's rules.
    """
    check_w8a8_operand(op)
    check_activation(x, "x", op.k, "K")
    act_scale = check_act_scale(act_scale)
    plan_triton_w8a8(op, x.shape[0], config)          # config errors before tracing
    if x.shape[0] == 0:                                    # no rows: no grid to launch
        return jnp.zeros((0, op.n), x.dtype)
    return _w8a8_triton(x, op, act_scale, config, interpret)


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------

forward = w8a8_triton
SPACE = qmatmul_triton.SPACE
MAX_CONFIGS = qmatmul_triton.MAX_CONFIGS


def unsupported(op: QOperand) -> str | None:
    """Why the Triton W8A8 kernel cannot run `op` (the xla backend can), or None."""
    if op.num_blocks > 1 and largest_pow2_divisor(op.block_size) < _MIN_K:
        return (f"int8 weight with block_size {op.block_size}: the Triton W8A8 kernel needs "
                f"scale blocks that are a multiple of a power-of-two K step >= {_MIN_K}")
    return None


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """As qmatmul's Triton space (split_k for decode only); pruned by `plan_triton_w8a8`,
    duplicates after clamping, shared memory (int8 x and code tiles) and registers."""
    decode = problem.m <= DECODE_M
    limit, gpu = smem_limit(device_kind)
    configs = _space.grid(space, **({"block_m": 16} if decode else {"split_k": 1}))

    def prune(p):
        smem = p.num_stages * (p.bm * p.bk + p.bk * p.bn + 2 * p.bn * 4)
        if smem > limit:
            return f"needs ~{smem >> 10} KiB of shared memory (> {limit >> 10} KiB on {gpu})"
        return register_pressure(p.bm, p.bn, p.num_warps)

    kept, pruned = _space.search(
        configs, lambda c: plan_triton_w8a8(op, problem.m, c),
        lambda p: (p.bm, p.bn, p.bk, p.split, p.num_warps, p.num_stages), prune)
    return kept, pruned, default_config("triton", problem.m)
