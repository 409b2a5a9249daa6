"""Mosaic (TPU) Pallas kernels for weight-only quantised matmul.

    y  = qmatmul_mosaic(x, op)      # y[M, N]  = x[M, K]  @ W        (forward)
    dx = qmatmul_t_mosaic(dy, op)   # dx[M, K] = dy[M, N] @ W.T      (gradient for x)

`op` is a `QOperand` (see `_operand.py`): codes `data [Kd, N]`, float32 `scales [nb, N]`,
optional int8 `zeros [nb, N]`, format, block size B and logical K. Both kernels read the
stored weight as it is (no per-call copy, pad or transpose of the codes, scales or zeros);
only the activations are padded, which is cheap.

Kernels
-------
* decode (M <= 16): grid (N tiles "parallel", K tiles "arbitrary"). x is padded to 8 rows
  (16 for bfloat16, whose sublane tile is 16 rows) and every grid step sees all of it.
* tiled (larger M): grid (M tiles, N tiles, K tiles), the first two "parallel".
* transposed: grid (M tiles, K tiles, N tiles); N is contracted, so it is the "arbitrary"
  (innermost) axis and the output tile is [block_m, K tile].

Every grid step dequantises its weight tile into a VMEM scratch ([K tile, block_n], in the
dtype of the dot: bfloat16 for bfloat16 activations, float32 otherwise; float16
activations are cast to float32 by the wrapper, as TPUs have no float16 arithmetic) block
by block,
with static, block-aligned row slices: `(decode(codes) - zero_row) * scale_row`, the scale
and zero rows broadcast over the B rows of their block. It then does one MXU dot per
stream into a float32 accumulator (a VMEM scratch, initialised at the first K step and
written out, in the activation dtype, at the last).

4-bit formats pack by halves: byte row i holds logical row i (low nibble) and row
Kp/2 + i (high nibble). A data tile of `t` byte rows therefore covers two logical K
ranges ("streams"): [i0, i0 + t) and [Kp/2 + i0, Kp/2 + i0 + t). The kernel gets two
x tiles (two BlockSpecs over the same padded x), dequantises both nibbles and does two
dots. In the transposed kernel the two streams are two outputs, joined by the wrapper.

Tiling rules (Mosaic TPU: each block's last two dims divisible by (8, 128) or equal to the
array's) and how scales are blocked
---------------------------------------------------------------------------------------
`block_k` is the height of the data tile: rows of each K stream per grid step (a 4-bit
step consumes 2 * block_k logical rows). With nb scale rows and per-stream blocks nh
(nb / 2 for 4-bit formats, nb otherwise):

* nb == 1 (per-channel): the scale block is the whole [1, block_n] row (legal: it equals
  the array's row count). block_k must be a multiple of 128 (or >= Kd); a K tail that
  block_k does not divide is a partial edge block, masked to zero inside the kernel.
* block_k >= Kd (one K step): the scale block is the whole [nb, block_n] column strip and
  each stream slices its rows statically. The data block is all Kd rows (legal: full
  dim); the x tile is Kd rounded up to 128 columns, the scratch's tail rows are zero.
* otherwise (several K steps): block_k must be a multiple of B, with R = block_k / B a
  multiple of 8 (so the [R, block_n] scale block is (8, 128)-legal) that divides nh (so
  the high stream's scale block starts at a whole block index, nh / R, and no tile is
  ragged). For B = 64 (nf4) that is block_k in {512, 1024, ...}; for B = 128, 1024, ...
  Scale and zero blocks then come through their own BlockSpecs (one per stream) and the
  pipeline fetches exactly the rows a step needs.

N is tiled by block_n (a multiple of 128) or taken whole when N <= block_n. A ragged last
N tile is a partial edge block: in the forward kernel its garbage columns stay in output
columns that Pallas never writes back; in the transposed kernel (where N is contracted)
the weight tile's columns past N are masked to zero and dy is zero-padded along N.

float8 codes are passed bitcast to uint8 and decoded from their bits with integer ops and
a few selects (`_decode.fp8_from_bits`): `.astype(jnp.float32)` on a float8 tile does lower
for TPU in this jax, but not every TPU generation has float8 vector support and a lowering
that succeeds does not prove Mosaic's compiler accepts the conversion there; the bit
decode is exact (all 256 codes, NaN and inf included) and uses only int32/float32 ops.

Checked on a CPU-only machine: numerics in interpret mode (also under the TPU
interpreter's race detector) and the Pallas-to-Mosaic lowering (`jax.export` for "tpu").
Mosaic's own compiler runs only on a TPU and has not seen these kernels yet.

With `config=None` the block sizes come from `default_config("mosaic_tpu", M)` and are
adjusted to the nearest legal ones; an explicit config that breaks a rule raises a
ValueError that names the rule.

Example:
    >>> op = canonical_operand(qkern.quantize(w, "nf4"))
    >>> y = qmatmul_mosaic(x, op)                     # on a TPU
    >>> y = qmatmul_mosaic(x, op, interpret=True)     # anywhere (slow), for tests
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ... import _compat
from .. import _space
from .._mosaic_common import (LANES, SUBLANES, VMEM_DEFAULT, VMEM_MAX, accumulate,
                             check_k_tile, compiler_params, round_up, tile_m, tile_n)
from .._config import DECODE_M, MatmulConfig, default_config
from .._decode import decode_nibbles, decode_unpacked, fp8_from_bits, split_nibbles
from .._operand import QOperand
from .base import DTYPES, check_activation, check_operand, reference, reference_t

__all__ = ["qmatmul_mosaic", "qmatmul_t_mosaic", "qmatmul_reference", "qmatmul_t_reference",
           "plan_mosaic"]

_SEGMENT_ROWS = 256          # rows dequantised per statement (bounds live values)


# --------------------------------------------------------------------------------------
# Decoding inside the kernel
# --------------------------------------------------------------------------------------

def _decode_raw(raw, fmt):
    """A tile of stored codes -> one unscaled float32 tile per K stream."""
    if fmt.packed:
        lo, hi = split_nibbles(raw)
        return [decode_nibbles(lo, fmt), decode_nibbles(hi, fmt)]
    if fmt.kind in ("float", "mx"):
        return [fp8_from_bits(raw.astype(jnp.int32), fmt.float_dtype)]
    return [decode_unpacked(raw, fmt)]


# --------------------------------------------------------------------------------------
# The tiling plan
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling of one call; every field is a Python int/str/bool/tuple."""
    kernel: str              # "decode" | "tiled" | "transposed"
    streams: int             # 2 for 4-bit formats (low/high halves), else 1
    bm: int                  # M tile
    mp: int                  # padded M (a multiple of bm)
    bn: int                  # N tile
    nn: int                  # N tiles
    kd: int                  # data rows per stream (the stored array's rows)
    td: int                  # data rows per K step (the data block's height)
    tx: int                  # x columns per stream per K step (>= td, multiple of 128)
    nk: int                  # K steps
    scale_mode: str          # "row" (nb == 1) | "whole" (one K step) | "tiled"
    scale_rows: int          # height of the scale (and zero) block
    hi_row: int              # "whole": static row offset of the high stream's scales
    hi_block: int            # "tiled": block-index offset of the high stream's scales
    segments: tuple          # ((row0, rows, scale_row), ...) within a data tile
    mask_k: bool             # last K tile is partial: zero rows >= kd
    mask_n: bool             # transposed: last N tile is partial: zero columns >= N
    compute_dtype: str       # dtype of the dequantised tile and of the dot operands
    vmem_bytes: int          # estimate of VMEM held by one kernel instance

    @property
    def hx(self) -> int:
        """Padded x columns per stream."""
        return self.nk * self.tx


def unsupported(op: QOperand) -> str | None:
    """Why the Mosaic kernels cannot run `op` (the xla backend can), or None."""
    if jnp.dtype(op.scales.dtype) != jnp.dtype(jnp.float32):
        return (f"the Mosaic kernels take float32 scales (double quantisation undone); got "
                f"{op.scales.dtype}")
    if op.num_blocks > 1 and op.block_size % SUBLANES:
        return (f"block_size {op.block_size} is not a multiple of {SUBLANES}: the Mosaic "
                "kernels dequantise whole blocks at sublane-aligned offsets")
    return None


def _check_operand(op: QOperand):
    check_operand(op)
    why = unsupported(op)
    if why is not None:
        raise ValueError(f"{why}; use the xla backend, or a block size that is a multiple "
                         "of 8.")


def _auto_block_k(t0: int, kd: int, b: int, nb: int, nh: int) -> int:
    """The legal data-tile height nearest the heuristic t0."""
    if kd <= t0:
        return kd
    if nb == 1:
        # prefer a multiple of 128 that divides kd (no masked tail) within a factor 2 of t0
        t0 = round_up(t0, LANES)
        divs = [t for t in range(LANES, 2 * t0 + 1, LANES) if kd % t == 0 and 2 * t >= t0]
        if divs:
            return min(divs, key=lambda t: (abs(math.log(t / t0)), -t))
        return kd if kd <= 2 * t0 else t0                  # one step, or a masked K tail
    cands = [r * b for r in range(SUBLANES, nh, SUBLANES)
             if nh % r == 0 and (r * b) % LANES == 0]
    if not cands:
        return kd                                          # one K step, whole scale strip
    return min(cands, key=lambda t: (abs(math.log(t / t0)), -t))


def _k_tiling(op: QOperand, block_k: int, explicit: bool):
    """(td, tx, nk, scale_mode, scale_rows, hi_row, hi_block, segments, mask_k)."""
    fmt, b, nb = op.fmt, op.block_size, op.num_blocks
    kd = op.data.shape[0]
    streams = 2 if fmt.packed else 1
    nh = nb // streams if nb > 1 else 1
    t = block_k if explicit else _auto_block_k(block_k, kd, b, nb, nh)

    if t >= kd:                                            # one K step
        td, tx, nk = kd, round_up(kd, LANES), 1
    else:
        r = check_k_tile(t, kd, b, nb, f"{fmt.name} operand")
        if nb > 1 and nh % r:
            raise ValueError(
                f"block_k={t} ({r} blocks) does not divide the {nh} blocks of each K "
                f"stream of this {fmt.name} operand: the high stream's scales would not "
                f"start on a tile boundary. Use a block_k whose block count divides {nh}, "
                f"or block_k >= {kd}.")
        td = tx = t
        nk = -(-kd // t)

    if nb == 1:
        mode, rows, hi_row, hi_block = "row", 1, 0, 0
        segs = tuple((r0, min(_SEGMENT_ROWS, td - r0), 0) for r0 in range(0, td, _SEGMENT_ROWS))
    else:
        rows_per_tile = td // b
        if nk == 1:
            mode, rows, hi_row, hi_block = "whole", nb, nh, 0
        else:
            mode, rows, hi_row, hi_block = "tiled", rows_per_tile, 0, nh // rows_per_tile
        seg_rows = min(b, _SEGMENT_ROWS)
        segs = tuple((r * b + c, min(seg_rows, b - c), r)
                     for r in range(rows_per_tile) for c in range(0, b, seg_rows))
    mask_k = nk * td > kd and nk > 1
    return td, tx, nk, mode, rows, hi_row, hi_block, segs, mask_k


def _vmem_estimate(plan: _Plan, act_itemsize: int, data_itemsize: int, has_zeros: bool) -> int:
    """Bytes of VMEM one kernel instance holds: double-buffered blocks, scratches and the
    decode temporaries of one segment."""
    p = plan
    cdt = jnp.dtype(p.compute_dtype).itemsize
    n_scale_refs = p.streams if p.scale_mode == "tiled" else 1
    scale = 2 * n_scale_refs * p.scale_rows * p.bn * (4 + (1 if has_zeros else 0))
    data = 2 * p.td * p.bn * data_itemsize
    wq = p.streams * p.tx * p.bn * cdt
    seg = 6 * min(p.td, _SEGMENT_ROWS) * p.bn * 4
    if p.kernel == "transposed":
        lhs = 2 * p.bm * p.bn * act_itemsize
        out = p.streams * p.bm * p.tx * (2 * act_itemsize + 4)
    else:
        lhs = 2 * p.streams * p.bm * p.tx * act_itemsize
        out = p.bm * p.bn * (2 * act_itemsize + 4)
    return scale + data + wq + seg + lhs + out


def plan_mosaic(op: QOperand, m: int, dtype, config: MatmulConfig | None = None, *,
                kernel: str | None = None) -> _Plan:
    """The static tiling `qmatmul_mosaic` (kernel "decode"/"tiled") or `qmatmul_t_mosaic`
    (kernel "transposed") uses for an [m, ...] activation of `dtype`.

    `config=None` starts from `default_config("mosaic_tpu", m)` and moves each block size
    to the nearest legal one (and narrows block_n if a one-step K tile would not fit the
    default VMEM budget); an explicit config is taken as given and a ValueError names the
    rule it breaks. `kernel=None` picks decode for m <= 16 and tiled otherwise.

        >>> plan_mosaic(op, 1, jnp.bfloat16).td      # rows of the data tile per K step
    """
    _check_operand(op)
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"activation dtype {dtype.name} is not supported; use float32, "
                         "bfloat16 or float16.")
    if kernel is None:
        kernel = "decode" if m <= DECODE_M else "tiled"
    if kernel not in ("decode", "tiled", "transposed"):
        raise ValueError(f"kernel must be 'decode', 'tiled' or 'transposed'; got {kernel!r}.")
    if kernel == "decode" and m > DECODE_M:
        raise ValueError(f"the decode kernel takes M <= {DECODE_M}; got M={m}. Use the tiled "
                         "kernel.")
    if config is not None and not isinstance(config, MatmulConfig):
        raise ValueError(f"config must be a MatmulConfig, got {type(config).__name__}.")
    if config is not None:
        return _make_plan(op, m, dtype, config, kernel, explicit=True)
    plan = _make_plan(op, m, dtype, default_config("mosaic_tpu", m), kernel, explicit=False)
    if plan.vmem_bytes > VMEM_DEFAULT and plan.bn > LANES:
        # a big one-step K tile (no smaller legal one): narrow the N tile
        cfg = dataclasses.replace(default_config("mosaic_tpu", m), block_n=LANES)
        plan = _make_plan(op, m, dtype, cfg, kernel, explicit=False)
    if plan.vmem_bytes > VMEM_MAX:
        raise ValueError(
            f"no K tiling of this {op.fmt.name} operand ({op.num_blocks} blocks of "
            f"{op.block_size}) fits VMEM: its blocks per K stream have no divisor that is a "
            f"multiple of 8, so all {plan.kd} rows form one tile (about "
            f"{plan.vmem_bytes >> 20} MiB). Use the xla backend or requantise with a block "
            "count divisible by 16.")
    return plan


def _make_plan(op: QOperand, m: int, dtype, cfg: MatmulConfig, kernel: str,
               explicit: bool) -> _Plan:
    n = op.n
    # float16 runs as float32 (the wrapper casts): sublane tiling of the kernel's dtype
    sub = 16 if dtype == jnp.dtype(jnp.bfloat16) else SUBLANES
    if kernel == "decode" or (kernel == "transposed" and m <= DECODE_M):
        bm = round_up(m, sub)                              # one M tile, all of (padded) M
    else:
        bm = tile_m(m, cfg.block_m, sub, explicit)
    bn = tile_n(n, cfg.block_n, explicit)
    td, tx, nk, mode, rows, hi_row, hi_block, segs, mask_k = _k_tiling(op, cfg.block_k,
                                                                       explicit)
    plan = _Plan(
        kernel=kernel, streams=2 if op.fmt.packed else 1, bm=bm, mp=round_up(m, bm), bn=bn,
        nn=-(-n // bn), kd=op.data.shape[0], td=td, tx=tx, nk=nk, scale_mode=mode,
        scale_rows=rows, hi_row=hi_row, hi_block=hi_block, segments=segs, mask_k=mask_k,
        mask_n=(kernel == "transposed" and n % bn != 0),
        compute_dtype="bfloat16" if dtype == jnp.dtype(jnp.bfloat16) else "float32",
        vmem_bytes=0)
    act = 2 if dtype == jnp.dtype(jnp.bfloat16) else 4
    est = _vmem_estimate(plan, act, jnp.dtype(op.data.dtype).itemsize, op.zeros is not None)
    if explicit and est > VMEM_MAX:
        raise ValueError(f"this tiling needs about {est >> 20} MiB of VMEM (> {VMEM_MAX >> 20}"
                         "); use smaller block_k / block_n / block_m.")
    return dataclasses.replace(plan, vmem_bytes=est)


# --------------------------------------------------------------------------------------
# Kernel bodies
# --------------------------------------------------------------------------------------

def _dequantise_tile(plan: _Plan, fmt, w_ref, s_refs, z_refs, wq_refs, *, rows_valid=None,
                     cols_valid=None):
    """Write (decode(codes) - zero) * scale of the current data tile into wq_refs (one
    [tx, bn] scratch per stream), block by block at static row offsets; rows past the
    data (rows_valid, or the scratch's tail when td < tx) and columns past N (cols_valid)
    become zero."""
    cdt = wq_refs[0].dtype
    # int8 zero points: convert the (small) block once and slice rows of the float32 value,
    # rather than load single int8 rows (sub-32-bit types pack 4 rows per sublane).
    zf = [z[...].astype(jnp.float32) for z in z_refs] if z_refs else None
    for r0, nrows, srow in plan.segments:
        vals = _decode_raw(w_ref[r0:r0 + nrows, :], fmt)
        for s, v in enumerate(vals):
            if len(s_refs) > 1:                     # "tiled": one scale block per stream
                s_ref, z, row = s_refs[s], zf[s] if zf else None, srow
            else:                                   # "row" / "whole": one strip, offset rows
                s_ref, z = s_refs[0], zf[0] if zf else None
                row = srow + (plan.hi_row if s == 1 else 0)
            if z is not None:
                v = v - z[row:row + 1, :]
            v = v * s_ref[row:row + 1, :]
            if rows_valid is not None:
                ri = jax.lax.broadcasted_iota(jnp.int32, v.shape, 0) + r0
                v = jnp.where(ri < rows_valid, v, 0.0)
            if cols_valid is not None:
                ci = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
                v = jnp.where(ci < cols_valid, v, 0.0)
            wq_refs[s][r0:r0 + nrows, :] = v.astype(cdt)
    if plan.td < plan.tx:
        for wq in wq_refs:
            wq[plan.td:, :] = jnp.zeros((plan.tx - plan.td, wq.shape[1]), cdt)


def _dot_precision(plan: _Plan):
    return jax.lax.Precision.HIGHEST if plan.compute_dtype == "float32" else None


def _split_refs(refs, counts):
    out, i = [], 0
    for c in counts:
        out.append(list(refs[i:i + c]))
        i += c
    return out


def _qmatmul_kernel(*refs, plan: _Plan, fmt, has_zeros: bool, k_axis: int):
    """One (M tile, N tile, K tile) step of y = x @ W (decode: no M axis)."""
    s = plan.streams
    ns = s if plan.scale_mode == "tiled" else 1
    x_refs, (w_ref,), s_refs, z_refs, (o_ref,), wq_refs, acc = _split_refs(
        refs, (s, 1, ns, ns if has_zeros else 0, 1, s, 1 if plan.nk > 1 else 0))
    k = pl.program_id(k_axis)
    rows_valid = plan.kd - k * plan.td if plan.mask_k else None
    _dequantise_tile(plan, fmt, w_ref, s_refs, z_refs, wq_refs, rows_valid=rows_valid)
    cdt = wq_refs[0].dtype
    part = None
    for x_ref, wq in zip(x_refs, wq_refs):
        d = jnp.dot(x_ref[...].astype(cdt), wq[...], preferred_element_type=jnp.float32,
                    precision=_dot_precision(plan))
        part = d if part is None else part + d

    def write(v):
        o_ref[...] = v.astype(o_ref.dtype)

    if plan.nk == 1:
        write(part)
    else:
        accumulate(acc[0], part, k, plan.nk - 1, write)


def _qmatmul_t_kernel(*refs, plan: _Plan, fmt, has_zeros: bool, n: int):
    """One (M tile, K tile, N tile) step of dx = dy @ W.T; N (of size n) is contracted."""
    s = plan.streams
    ns = s if plan.scale_mode == "tiled" else 1
    (dy_ref,), (w_ref,), s_refs, z_refs, o_refs, wq_refs, accs = _split_refs(
        refs, (1, 1, ns, ns if has_zeros else 0, s, s, s if plan.nn > 1 else 0))
    j = pl.program_id(2)
    cols_valid = n - j * plan.bn if plan.mask_n else None
    _dequantise_tile(plan, fmt, w_ref, s_refs, z_refs, wq_refs, cols_valid=cols_valid)
    cdt = wq_refs[0].dtype
    dy = dy_ref[...].astype(cdt)
    for st in range(s):
        part = jax.lax.dot_general(dy, wq_refs[st][...], (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32,
                                   precision=_dot_precision(plan))

        def write(v, o_ref=o_refs[st]):
            o_ref[...] = v.astype(o_ref.dtype)

        if plan.nn == 1:
            write(part)
        else:
            accumulate(accs[st], part, j, plan.nn - 1, write)


# --------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------

def _kernel_data(op: QOperand):
    """The stored codes as the kernel reads them (float8 bitcast to uint8: free)."""
    if jnp.issubdtype(op.data.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(op.data, jnp.uint8)
    return op.data


def _kernel_activation(a):
    """float16 runs as float32: TPUs have no float16 arithmetic, and the casts touch only
    the activations (XLA fuses them with the padding)."""
    return a.astype(jnp.float32) if a.dtype == jnp.dtype(jnp.float16) else a


def _pad_activation(x, op: QOperand, plan: _Plan):
    """x [M, K] -> [mp, streams * hx]: zero-padded to Kp, split into the K streams, each
    zero-padded to nk * tx columns."""
    m, k = x.shape
    x = jnp.pad(x, ((0, plan.mp - m), (0, op.k_padded - k)))
    parts = [x[:, :plan.kd], x[:, plan.kd:]] if plan.streams == 2 else [x]
    parts = [jnp.pad(p, ((0, 0), (0, plan.hx - p.shape[1]))) for p in parts]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _scale_specs(plan: _Plan, index):
    """BlockSpecs for the scales (and, identically, the zeros): one per stream when tiled
    along K, else one whole-height strip. `index(f)` builds the grid's index_map from
    f(k) -> the block's row index."""
    if plan.scale_mode == "tiled":
        return [pl.BlockSpec((plan.scale_rows, plan.bn), index(lambda k: k)),
                pl.BlockSpec((plan.scale_rows, plan.bn),
                             index(lambda k, o=plan.hi_block: k + o))][:plan.streams]
    return [pl.BlockSpec((plan.scale_rows, plan.bn), index(lambda k: 0))]


def _weight_inputs(op: QOperand, plan: _Plan, index):
    """(arrays, specs) for data, scales and zeros."""
    arrays = [_kernel_data(op)]
    specs = [pl.BlockSpec((plan.td, plan.bn), index(lambda k: k))]
    sspecs = _scale_specs(plan, index)
    arrays += [op.scales] * len(sspecs)
    specs += sspecs
    if op.zeros is not None:
        arrays += [op.zeros] * len(sspecs)
        specs += _scale_specs(plan, index)
    return arrays, specs


def qmatmul_mosaic(x, op: QOperand, config: MatmulConfig | None = None, *, interpret=False,
                   kernel: str | None = None):
    """y[M, N] = x[M, K] @ W for a quantised W, on TPU via Mosaic.

    x: float32, bfloat16 or float16 [M, K]; y has x's dtype, accumulated in float32.
    config: block_m (M tile of the tiled kernel), block_n (N tile), block_k (data rows per
    K step; see the module docstring for the rules); num_warps, num_stages and split_k are
    Triton's and ignored. None: `default_config("mosaic_tpu", M)` moved to legal tiles;
    an explicit config is validated and a ValueError names any rule it breaks.
    interpret: False on a TPU; True or `pltpu.InterpretParams(...)` to run anywhere.
    kernel: None (decode for M <= 16, tiled otherwise), "decode" or "tiled".

        >>> y = qmatmul_mosaic(x, canonical_operand(qkern.quantize(w, "int4")))
    """
    _check_operand(op)
    check_activation(x, "x", op.k, "K")
    m, out_dtype = x.shape[0], x.dtype
    plan = plan_mosaic(op, m, x.dtype, config, kernel=kernel)
    if plan.kernel == "transposed":
        raise ValueError("kernel='transposed' is qmatmul_t_mosaic's; use 'decode' or 'tiled'.")
    s = plan.streams
    x = _kernel_activation(x)
    xp = _pad_activation(x, op, plan)
    nk = plan.nk
    if plan.kernel == "decode":
        grid = (plan.nn, nk)
        x_specs = [pl.BlockSpec((plan.mp, plan.tx), lambda j, k, o=st * nk: (0, k + o))
                   for st in range(s)]
        index = lambda f: (lambda j, k: (f(k), j))
        out_spec = pl.BlockSpec((plan.mp, plan.bn), lambda j, k: (0, j))
        semantics = ("parallel", "arbitrary")
        k_axis = 1
    else:
        grid = (plan.mp // plan.bm, plan.nn, nk)
        x_specs = [pl.BlockSpec((plan.bm, plan.tx), lambda i, j, k, o=st * nk: (i, k + o))
                   for st in range(s)]
        index = lambda f: (lambda i, j, k: (f(k), j))
        out_spec = pl.BlockSpec((plan.bm, plan.bn), lambda i, j, k: (i, j))
        semantics = ("parallel", "parallel", "arbitrary")
        k_axis = 2
    w_arrays, w_specs = _weight_inputs(op, plan, index)
    cdt = jnp.dtype(plan.compute_dtype)
    scratch = [pltpu.VMEM((plan.tx, plan.bn), cdt) for _ in range(s)]
    if nk > 1:
        scratch.append(pltpu.VMEM((plan.bm, plan.bn), jnp.float32))
    n = op.n
    kern = functools.partial(_qmatmul_kernel, plan=plan, fmt=op.fmt,
                             has_zeros=op.zeros is not None, k_axis=k_axis)
    flops = 2 * plan.mp * s * plan.hx * n
    bytes_accessed = (xp.size * xp.dtype.itemsize * plan.nn
                      + op.data.size * op.data.dtype.itemsize * (plan.mp // plan.bm)
                      + plan.mp * n * x.dtype.itemsize)
    y = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((plan.mp, n), x.dtype),
        grid=grid,
        in_specs=x_specs + w_specs,
        out_specs=out_spec,
        scratch_shapes=scratch,
        compiler_params=compiler_params(plan.vmem_bytes, semantics),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=bytes_accessed),
        interpret=interpret,
        name=f"qmatmul_{plan.kernel}_{op.fmt.name}",
    )(*([xp] * s), *w_arrays)
    y = y[:m] if plan.mp != m else y
    return y.astype(out_dtype)


def qmatmul_t_mosaic(dy, op: QOperand, config: MatmulConfig | None = None, *,
                     interpret=False):
    """dx[M, K] = dy[M, N] @ W.T from the stored W (no transposed copy), on TPU via Mosaic:
    the gradient of `qmatmul_mosaic` with respect to x.

    The weight tile is dequantised exactly as in the forward kernel and contracted along
    N (`dot_general` with both operands' last dims contracted). For 4-bit formats each
    data tile yields two output tiles (the low and high K halves), written to two outputs
    that the wrapper joins. Arguments as in `qmatmul_mosaic`.

        >>> dx = qmatmul_t_mosaic(dy, op)     # dy: [M, N]
    """
    _check_operand(op)
    check_activation(dy, "dy", op.n, "N")
    m, out_dtype = dy.shape[0], dy.dtype
    plan = plan_mosaic(op, m, dy.dtype, config, kernel="transposed")
    s, n = plan.streams, op.n
    dy = _kernel_activation(dy)
    dyp = jnp.pad(dy, ((0, plan.mp - m), (0, plan.nn * plan.bn - n)))
    grid = (plan.mp // plan.bm, plan.nk, plan.nn)
    index = lambda f: (lambda i, k, j: (f(k), j))
    w_arrays, w_specs = _weight_inputs(op, plan, index)
    cdt = jnp.dtype(plan.compute_dtype)
    scratch = [pltpu.VMEM((plan.tx, plan.bn), cdt) for _ in range(s)]
    if plan.nn > 1:
        scratch += [pltpu.VMEM((plan.bm, plan.tx), jnp.float32) for _ in range(s)]
    kern = functools.partial(_qmatmul_t_kernel, plan=plan, fmt=op.fmt,
                             has_zeros=op.zeros is not None, n=n)
    out_shape = [jax.ShapeDtypeStruct((plan.mp, plan.hx), dy.dtype) for _ in range(s)]
    flops = 2 * plan.mp * s * plan.hx * plan.nn * plan.bn
    bytes_accessed = (dyp.size * dyp.dtype.itemsize * plan.nk
                      + op.data.size * op.data.dtype.itemsize * (plan.mp // plan.bm)
                      + s * plan.mp * plan.hx * dy.dtype.itemsize)
    outs = pl.pallas_call(
        kern,
        out_shape=out_shape,
        grid=grid,
        in_specs=[pl.BlockSpec((plan.bm, plan.bn), lambda i, k, j: (i, j))] + w_specs,
        out_specs=[pl.BlockSpec((plan.bm, plan.tx), lambda i, k, j: (i, k)) for _ in range(s)],
        scratch_shapes=scratch,
        compiler_params=compiler_params(plan.vmem_bytes, ("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=bytes_accessed),
        interpret=interpret,
        name=f"qmatmul_t_{op.fmt.name}",
    )(dyp, *w_arrays)
    dx = outs[0][:m, :plan.kd] if s == 1 else jnp.concatenate(
        [o[:m, :plan.kd] for o in outs], axis=1)
    return dx[:, :op.k].astype(out_dtype)


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------

qmatmul_reference = reference          # the kernels' meaning (base.py)
qmatmul_t_reference = reference_t


# --------------------------------------------------------------------------------------
# Config sweep
# --------------------------------------------------------------------------------------

def _lowers_for_tpu(f, *args) -> bool:
    try:
        txt = _compat.export(f, "tpu", *args).mlir_module()
    except Exception:                                     # noqa: BLE001 - reported as "no"
        return False
    return "tpu_custom_call" in txt


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------

forward = qmatmul_mosaic
transposed = qmatmul_t_mosaic

SPACE = dict(block_m=(16, 32, 64, 128, 256), block_n=(128, 256, 512, 1024),
             block_k=(256, 512, 1024, 2048, 4096))
MAX_CONFIGS = 32


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """Mosaic's space: block_m (tiled kernel only), block_n, block_k. Pruned: what
    `plan_mosaic` rejects (the (8, 128) tiling rules, K tiles not covering whole scale
    blocks, over the VMEM budget) and duplicates of the same plan."""
    kernel = ("transposed" if problem.kernel.endswith("_t")
              else "decode" if problem.m <= DECODE_M else "tiled")
    configs = _space.grid({k: space[k] for k in ("block_m", "block_n", "block_k")},
                          **({"block_m": 16} if problem.m <= DECODE_M else {}))
    kept, pruned = _space.search(
        configs, lambda c: plan_mosaic(op, problem.m, problem.x_dtype, c, kernel=kernel),
        lambda p: (p.bm, p.bn, p.td, p.nk))
    return kept, pruned, default_config("mosaic_tpu", problem.m)
