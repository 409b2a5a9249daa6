"""W8A8 matmul for TPUs: int8 activations times an int8 weight, lowered through Mosaic.

    y = w8a8_mosaic(x, op)                    # x [M, K] float, op an int8 QOperand of W [K, N]
    y = w8a8_mosaic(x, op, act_scale=s)       # static per-tensor activation scale

    y[m, n] = sx[m] * sum_b sw[b, n] * sum_{k in b} xq[m, k] * wq[k, n]

x is quantised by the XLA pre-pass every W8A8 backend shares (`quantize_activations`:
per-row absmax, or the static act_scale), which writes int8 codes [M, K] and float32 row
scales [M, 1]; see w8a8/_triton.py for why the pre-pass rather than in-kernel rounding.
The kernel reads the stored int8 weight as it is (no copy, pad or transpose) and feeds the
MXU int8 x int8 with int32 results.

Grid (M tiles "parallel", N tiles "parallel", K tiles "arbitrary"); decode (M <= 16) is
the same kernel with one M tile. The accumulator is a VMEM scratch, set at the first K
step, added to after, scaled and written out (in x's dtype; float32 for float16 x, which
TPUs cannot compute in, cast by the wrapper) at the last:

* per channel (one scale row): one int8 dot per step into an int32 accumulator; the
  weight scale row [1, block_n] and the row scales [block_m, 1] multiply the result once.
* per block along K (blocks of B rows, B a multiple of 128): the K tile is B-aligned and
  each of its blocks is one int8 dot (static, lane-aligned slices of the x and weight
  tiles), converted to float32 and multiplied by its scale row, into a float32
  accumulator.

Tiling rules (Mosaic: each block's last two dims divisible by (8, 128) or equal to the
array's). int8 tiles pack 32 rows per sublane tile, so M tiles are multiples of 32 (x is
zero-padded; decode pads M to 32 rows). block_n is a multiple of 128 or all of N. K:

* block_k >= Kp (the stored rows): one K step, the x block is all Kp (padded) columns and
  the weight block all Kp rows (full dims: legal at any Kp); per-block scales come as the
  whole [nb, block_n] strip.
* otherwise block_k is a multiple of 128; with per-block scales also a multiple of B
  whose block count R = block_k / B is a multiple of 8 (the [R, block_n] scale block).
  A last K tile that overhangs the weight is a partial edge block: its rows past Kp hold
  whatever the pipeline left there, but they meet zero-padded x in integer arithmetic
  (exactly 0, never NaN) and their scale rows are masked to 0.

Checked without a TPU: interpret-mode numerics (also under the TPU interpreter's race
detector) and the Pallas-to-Mosaic lowering (`jax.export` for "tpu"). Mosaic's own
compiler runs only on a TPU and has not seen this kernel yet; int8 MXU support depends on
the TPU generation (v5e and v6e have it).

Example:
    op = stored_operand(qkern.quantize(w, "int8"))
    y = w8a8_mosaic(x, op)                     # on a TPU
    y = w8a8_mosaic(x, op, interpret=True)     # anywhere (slow; for tests)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import _space
from .._mosaic_common import (LANES, SUBLANES, VMEM_MAX, accumulate, check_k_tile,
                             compiler_params, round_up, tile_m, tile_n)
from .._config import DECODE_M, MatmulConfig, default_config
from ..qmatmul import _mosaic as qmatmul_mosaic
from .._operand import QOperand
from ..qmatmul.base import DTYPES, check_activation
from .base import check_act_scale, check_w8a8_operand, quantize_activations

__all__ = ["w8a8_mosaic", "plan_mosaic_w8a8"]

_INT8_ROWS = 32              # rows of an int8 sublane tile (4 per 32-bit sublane)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling of one call (Python ints and strings only)."""
    m: int
    bm: int                  # M tile (a multiple of 32)
    mp: int                  # padded M
    n: int
    bn: int                  # N tile
    nn: int                  # N tiles
    kp: int                  # stored weight rows
    tk: int                  # weight rows (and x columns) per K step
    nk: int                  # K steps
    nb: int                  # scale rows of the weight
    block_size: int
    scale_mode: str          # "row" (per channel) | "whole" (one K step) | "tiled"
    scale_rows: int          # height of the scale block
    mask_scales: bool        # "tiled" with a partial last K tile
    vmem_bytes: int

    @property
    def kx(self) -> int:
        """Columns of the padded x."""
        return self.nk * self.tk

    @property
    def kernel(self) -> str:
        return "decode" if self.mp == self.bm and self.m <= DECODE_M else "tiled"


def _auto_block_k(t0: int, kp: int, b: int, nb: int) -> int:
    """The legal K tile nearest the heuristic t0 (kp: one step)."""
    if nb == 1:
        if kp <= 2 * t0:
            return kp
        t0 = max(LANES, round_up(t0, LANES))
        divs = [t for t in range(LANES, 2 * t0 + 1, LANES) if kp % t == 0 and 2 * t >= t0]
        return min(divs, key=lambda t: (abs(t - t0), -t)) if divs else t0
    r = SUBLANES * max(1, round(t0 / (SUBLANES * b)))
    return kp if r * b >= kp else r * b


def _k_tiling(op: QOperand, block_k: int, explicit: bool):
    """(tk, nk, scale_mode, scale_rows, mask_scales)."""
    b, nb, kp = op.block_size, op.num_blocks, op.data.shape[0]
    if nb > 1 and b % LANES:
        raise ValueError(
            f"int8 weight with block_size {b}: the Mosaic W8A8 kernel does one int8 dot per "
            f"scale block on lane-aligned slices, so the block size must be a multiple of "
            f"{LANES}. Use per-channel scales, blocks of 128, 256, ..., or the xla backend.")
    t = block_k if explicit else _auto_block_k(block_k, kp, b, nb)
    if t >= kp:
        return kp, 1, ("row" if nb == 1 else "whole"), nb, False
    r = check_k_tile(t, kp, b, nb, "int8 weight")
    nk = -(-kp // t)
    if nb == 1:
        return t, nk, "row", 1, False
    return t, nk, "tiled", r, nb % r != 0


def _vmem_estimate(bm, bn, tk, scale_rows, out_itemsize) -> int:
    x = 2 * bm * tk
    w = 2 * tk * bn
    scales = 2 * round_up(scale_rows, SUBLANES) * bn * 4
    sx = 2 * bm * LANES * 4
    out = 2 * bm * bn * out_itemsize
    acc = bm * bn * 4
    temps = 3 * bm * bn * 4
    return x + w + scales + sx + out + acc + temps


def plan_mosaic_w8a8(op: QOperand, m: int, dtype=jnp.float32,
                     config: MatmulConfig | None = None) -> _Plan:
    """The static tiling `w8a8_mosaic` uses for an [m, K] activation of `dtype`.

    config=None starts from `default_config("mosaic_tpu", m)` and moves each block size to
    the nearest legal one; an explicit config is checked and a ValueError names the rule
    it breaks (block_m is then rounded up to a multiple of 32, int8's sublane tile).
    """
    check_w8a8_operand(op)
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"x dtype {dtype.name} is not supported; use float32, bfloat16 or "
                         "float16.")
    explicit = config is not None
    cfg = config if explicit else default_config("mosaic_tpu", m)
    if not isinstance(cfg, MatmulConfig):
        raise TypeError(f"config must be a MatmulConfig, got {type(cfg).__name__}.")
    n = op.n
    if m <= DECODE_M:
        bm = round_up(max(m, 1), _INT8_ROWS)
    else:
        bm = tile_m(m, cfg.block_m, _INT8_ROWS, explicit)
    bn = tile_n(n, cfg.block_n, explicit)
    tk, nk, mode, rows, mask = _k_tiling(op, cfg.block_k, explicit)
    out_itemsize = 2 if dtype == jnp.dtype(jnp.bfloat16) else 4
    est = _vmem_estimate(bm, bn, tk, rows, out_itemsize)
    if est > VMEM_MAX:
        raise ValueError(f"this W8A8 tiling (block_m={bm}, block_n={bn}, K tile {tk}) needs "
                         f"about {est >> 20} MiB of VMEM (> {VMEM_MAX >> 20}); use smaller "
                         "blocks.")
    return _Plan(m=m, bm=bm, mp=round_up(m, bm), n=n, bn=bn, nn=-(-n // bn),
                 kp=op.data.shape[0], tk=tk, nk=nk, nb=op.num_blocks,
                 block_size=op.block_size, scale_mode=mode, scale_rows=rows,
                 mask_scales=mask, vmem_bytes=est)


# --------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------


def _w8a8_kernel(x_ref, sx_ref, d_ref, s_ref, o_ref, *scratch, p: _Plan):
    """One (M tile, N tile, K tile) step. x_ref [bm, tk] int8, sx_ref [bm, 1] float32,
    d_ref [tk, bn] int8, s_ref [scale_rows, bn] float32, o_ref [bm, bn]."""
    k = pl.program_id(2)
    if p.scale_mode == "row":
        part = jnp.dot(x_ref[...], d_ref[...], preferred_element_type=jnp.int32)
    else:
        s = s_ref[...]
        if p.mask_scales:               # scale rows past the weight's blocks: garbage
            rows = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
            s = jnp.where(rows < p.nb - k * p.scale_rows, s, 0.0)
        b, part = p.block_size, None
        for r in range(p.scale_rows):
            d = jnp.dot(x_ref[:, r * b:(r + 1) * b], d_ref[r * b:(r + 1) * b, :],
                        preferred_element_type=jnp.int32)
            d = d.astype(jnp.float32) * s[r:r + 1, :]
            part = d if part is None else part + d

    def write(acc):
        y = acc.astype(jnp.float32)
        if p.scale_mode == "row":
            y = y * s_ref[...]
        o_ref[...] = (y * sx_ref[...]).astype(o_ref.dtype)

    if p.nk == 1:
        write(part)
        return
    (acc_ref,) = scratch
    accumulate(acc_ref, part, k, p.nk - 1, write)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _w8a8_mosaic(x, op, act_scale, config, interpret):
    m = x.shape[0]
    p = plan_mosaic_w8a8(op, m, x.dtype, config)
    xq, sx = quantize_activations(x, act_scale)
    xq = jnp.pad(xq, ((0, p.mp - m), (0, p.kx - xq.shape[1])))
    sx = jnp.pad(sx, ((0, p.mp - m), (0, 0)))
    out_dtype = jnp.float32 if x.dtype == jnp.dtype(jnp.float16) else x.dtype
    grid = (p.mp // p.bm, p.nn, p.nk)
    if p.scale_mode == "tiled":
        s_spec = pl.BlockSpec((p.scale_rows, p.bn), lambda i, j, k: (k, j))
    else:
        s_spec = pl.BlockSpec((p.scale_rows, p.bn), lambda i, j, k: (0, j))
    acc_dtype = jnp.int32 if p.scale_mode == "row" else jnp.float32
    scratch = [pltpu.VMEM((p.bm, p.bn), acc_dtype)] if p.nk > 1 else []
    y = pl.pallas_call(
        functools.partial(_w8a8_kernel, p=p),
        out_shape=jax.ShapeDtypeStruct((p.mp, p.n), out_dtype),
        grid=grid,
        in_specs=[pl.BlockSpec((p.bm, p.tk), lambda i, j, k: (i, k)),
                  pl.BlockSpec((p.bm, 1), lambda i, j, k: (i, 0)),
                  pl.BlockSpec((p.tk, p.bn), lambda i, j, k: (k, j)),
                  s_spec],
        out_specs=pl.BlockSpec((p.bm, p.bn), lambda i, j, k: (i, j)),
        scratch_shapes=scratch,
        compiler_params=compiler_params(p.vmem_bytes, ("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * p.mp * p.kx * p.n, transcendentals=0,
            bytes_accessed=p.mp * p.kx * p.nn + p.kp * p.n * (p.mp // p.bm)
            + p.mp * p.n * jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
        name=f"w8a8_mosaic_{p.kernel}",
    )(xq, sx, op.data, op.scales)
    return y[:m].astype(x.dtype)


def w8a8_mosaic(x: jax.Array, op: QOperand, config: MatmulConfig | None = None, *,
                act_scale=None, interpret=False) -> jax.Array:
    """y[M, N] = x[M, K] @ W on TPU via Mosaic, x quantised to int8 (per row, or by the
    static scalar act_scale), W a symmetric int8 QOperand; int32 products, x's dtype out.

    config: block_m / block_n / block_k (see the module docstring for the rules; warps,
    stages and split_k are Triton's and ignored); None takes `default_config("mosaic_tpu",
    M)` moved to legal tiles. interpret: False on a TPU; True or
    `pltpu.InterpretParams(...)` to run anywhere.
    """
    check_w8a8_operand(op)
    check_activation(x, "x", op.k, "K")
    act_scale = check_act_scale(act_scale)
    plan_mosaic_w8a8(op, x.shape[0], x.dtype, config)     # config errors before tracing
    if x.shape[0] == 0:                                    # no rows: no grid to launch
        return jnp.zeros((0, op.n), x.dtype)
    return _w8a8_mosaic(x, op, act_scale, config, interpret)


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------

forward = w8a8_mosaic
SPACE = qmatmul_mosaic.SPACE
MAX_CONFIGS = qmatmul_mosaic.MAX_CONFIGS


def unsupported(op: QOperand) -> str | None:
    """Why the Mosaic W8A8 kernel cannot run `op` (the xla backend can), or None."""
    if op.num_blocks > 1 and op.block_size % LANES:
        return (f"int8 weight with block_size {op.block_size}: the Mosaic W8A8 kernel needs "
                f"blocks that are a multiple of {LANES}")
    return None


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """block_m (tiled only), block_n, block_k; pruned by `plan_mosaic_w8a8` (the tiling
    rules, whole scale blocks per K tile, the VMEM budget) and duplicate plans."""
    configs = _space.grid({k: space[k] for k in ("block_m", "block_n", "block_k")},
                          **({"block_m": 16} if problem.m <= DECODE_M else {}))
    kept, pruned = _space.search(
        configs, lambda c: plan_mosaic_w8a8(op, problem.m, problem.x_dtype, c),
        lambda p: (p.bm, p.bn, p.tk, p.nk))
    return kept, pruned, default_config("mosaic_tpu", problem.m)
