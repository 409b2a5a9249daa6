"""Weight-only quantised matmul for NVIDIA GPUs: Pallas kernels lowered through Triton.

    y  = qmatmul_triton(x, op)      # y[M, N]  = x[M, K]  @ W          (forward)
    dx = qmatmul_t_triton(dy, op)   # dx[M, K] = dy[M, N] @ W.T        (gradient for x)

W is a `QOperand` (see `_operand.py`): stored codes `data [Kd, N]`, float32 `scales [nb, N]`
and optional int8 `zeros [nb, N]`, one scale row per block of B rows along K. The kernels
read the stored codes and decode each tile in registers; the weight is never copied,
padded, transposed or dequantised in memory. Only the activations (x or dy, small next to
W) are zero-padded, so every K (or N) tile the kernels touch is either real data or
multiplied by zeros.

Three kernels share one tile routine (`_accumulate_tile`):

* decode (M <= 16): one program per (N tile, K split); x padded to 16 rows so every dot
  is at least 16x16x16, which Triton's MMA needs. With `split_k > 1` each program sums
  its own contiguous range of K tiles into a float32 partial [16, block_n] and the
  partials are added outside the kernel: at M = 1 a [K, N] weight otherwise gives only
  N / block_n programs, too few to fill a GPU.
* tiled (M > 16): one program per (M tile, N tile), looping over all K tiles inside.
* transposed: one program per (M tile, K tile of the stored rows, N split), looping over
  N tiles inside. It contracts each [block_k, block_n] code tile against dy along N
  (`dot_general` contracting both operands' last dim), so the stored layout is used as is.

Tiles and scale blocks. `block_k` counts rows of `data` per step of the K loop: logical
rows for one-code-per-byte formats, byte rows for 4-bit formats, where one byte row holds
logical row i (low nibble) and row i + Kp/2 (high nibble). A 4-bit step therefore covers
two slices of x, [i0, i0+block_k) and [Kp/2 + i0, Kp/2 + i0 + block_k), and does two dots.
A step must not straddle a scale block partially, so block_k is a divisor of the block
size B or a multiple of it; a multiple is done as block_k / B sub-steps of B rows, each
with its own scale row. Per-block scales are applied to the [rows, block_n] dot result
(forward) or to the dy tile (transposed), never to the [block_k, block_n] weight tile:
fewer multiplies, and the codes (minus zero points) stay exact in bf16/f16 for the dot.
One block per column (per-channel scales) puts no constraint on block_k, and the forward
kernels apply the scale once after the whole K loop.

Edges. Triton's lowering does not mask out-of-bounds block accesses by itself, so the
kernels mask explicitly: loads of codes, scales and zeros past N (or past the stored rows
in a K tile that overhangs), and stores past M, N or K. A masked code reads as 0, which
decodes to a finite value in every format, and meets zero-padded activations, so it adds
exactly 0.

Example:

    from qkern.pallas._operand import canonical_operand
    op = canonical_operand(qkern.quantize(w, "nf4"))
    y = qmatmul_triton(x, op)                     # on an NVIDIA GPU
    y = qmatmul_triton(x, op, interpret=True)     # anywhere (slow; for tests)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ...formats import Format
from .. import _space
from .._config import DECODE_M, MatmulConfig, default_config
from .._decode import decode_nibbles, decode_unpacked, fp8_from_bits, split_nibbles
from .._operand import QOperand
from .._triton_common import (MIN_DOT, Tiling, checked_blocks, compiler_params, masked_load,
                              next_pow2, register_pressure, smem_limit, split_work,
                              tile_mask)
from .base import check_activation, check_operand, reference, reference_t

__all__ = ["qmatmul_triton", "qmatmul_t_triton", "reference", "reference_t"]



# --------------------------------------------------------------------------------------
# Decoding inside kernels.
# --------------------------------------------------------------------------------------


def _native_fp8_convert() -> bool:
    """Whether Triton can convert float8 tiles with its own cvt (sm_89 and newer).

    Pallas's Triton lowering refuses float8_e4m3fn casts below compute capability 8.9
    (an A100 is 8.0); there the kernels decode the bits arithmetically instead. With no
    GPU present (exporting from a CPU host) Pallas assumes 9.0, and so do we.
    """
    try:
        devices = jax.local_devices(backend="gpu")
    except RuntimeError:
        return True
    cc = getattr(devices[0], "compute_capability", None) if devices else None
    try:
        return cc is None or float(cc) >= 8.9
    except (TypeError, ValueError):
        return True


def _decode_tile(codes, p: "_Plan"):
    """A loaded code tile -> list of (values float32, half) with half 0 (low) / 1 (high)."""
    if p.packed:
        lo, hi = split_nibbles(codes)
        return [(decode_nibbles(lo, p.fmt), 0), (decode_nibbles(hi, p.fmt), 1)]
    if p.fp8_bits:
        bits = lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.int32)
        return [(fp8_from_bits(bits, p.fmt.float_dtype), 0)]
    return [(decode_unpacked(codes, p.fmt), 0)]


# --------------------------------------------------------------------------------------
# Static plan: validated, clamped tile sizes and the problem's geometry.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan(Tiling):
    fmt: Format
    packed: bool
    m: int                # rows of x / dy
    k: int                # logical K
    kd: int               # stored rows of data
    n: int
    nb: int               # scale blocks
    block_size: int
    half_rows: int        # packed: logical row of the high nibble half (Kp / 2)
    half_blocks: int      # packed: first scale block of the high half (nb / 2)
    has_zeros: bool
    fp8_bits: bool        # decode float8 from bits (GPUs without native fp8 cvt)

    @property
    def per_channel(self) -> bool:
        return self.nb == 1


def _plan(op: QOperand, m: int, config: MatmulConfig | None, *, transposed: bool) -> _Plan:
    """Validate `config` against the operand and clamp its blocks to the problem.

    A given config is checked strictly (block_k must be a multiple or a divisor of the
    block size; blocks must be powers of two, Triton's tensor rule); blocks larger than
    the problem are then shrunk, which changes no result. config=None starts from
    `default_config("triton", m)` and also picks a block_k that fits the block size.
    """
    fmt, B, nb = op.fmt, op.block_size, op.num_blocks
    kd, n = op.data.shape
    cfg, user, bm, bn, bk = checked_blocks(config, B, nb, f"{fmt.name} operand",
                                           default_config("triton", m))
    split = cfg.split_k if (transposed or m <= DECODE_M) else 1
    if transposed and not user and m <= DECODE_M:
        # The table's decode entry is tuned for the forward kernel. Here block_k is the
        # output tile's width and the grid has only Kd / block_k row tiles (8 for a
        # 4096-row int4 weight at 256): too few programs. Measured on an H100 (K = N =
        # 4096, M = 1, bf16): int4 57 -> 17 us, nf4 153 -> 31 us.
        bk, split = min(bk, 64), max(split, 8)
    # Clamp to the problem (never below the smallest dot Triton compiles).
    bn = max(MIN_DOT, min(bn, next_pow2(n)))
    bk = max(MIN_DOT, min(bk, next_pow2(kd)))
    bm = MIN_DOT if m <= DECODE_M else max(MIN_DOT, min(bm, next_pow2(m)))
    sub = bk if nb == 1 else min(bk, B)
    if sub < MIN_DOT:
        raise ValueError(
            f"{fmt.name} operand with block_size {B}: the Triton kernels need scale blocks "
            f"of at least {MIN_DOT} rows (one dot per block); use the xla backend.")
    total = pl.cdiv(n, bn) if transposed else pl.cdiv(kd, bk)
    steps, split = split_work(total, split)
    return _Plan(
        fmt=fmt, packed=fmt.packed, m=m, k=op.k, kd=kd, n=n, nb=nb, block_size=B,
        half_rows=op.k_padded // 2 if fmt.packed else 0,
        half_blocks=nb // 2 if fmt.packed else 0,
        has_zeros=op.zeros is not None,
        fp8_bits=op.fmt.byte_floats and not _native_fp8_convert(),
        bm=bm, bn=bn, bk=bk, sub=sub, steps=steps, split=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# --------------------------------------------------------------------------------------
# Kernel pieces.
# --------------------------------------------------------------------------------------


def _precision(dtype):
    """float32 activations get IEEE float32 dots: Triton's default for them is TF32,
    which measured 2e-4 relative error on an H100 against a 2e-5 tolerance."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _row_block(row0, p: _Plan, half: int):
    """Scale row for a step starting at stored row `row0` of the given nibble half.

    Clamped so that a step past the stored rows (whose codes are masked to 0 and meet
    zero activations) still reads a real, finite scale row.
    """
    if p.per_channel:
        return 0
    blk = lax.div(row0, p.block_size) + (p.half_blocks if half else 0)
    return jnp.minimum(blk, p.nb - 1)


def _with_zeros(refs, p: _Plan) -> tuple:
    """A kernel's refs as (activation, codes, scales, zeros or None, *the rest): the zeros
    ref is passed only for weights with zero points."""
    return tuple(refs) if p.has_zeros else (*refs[:3], None, *refs[3:])


def _t_geometry(p: _Plan) -> tuple:
    """What a transposed program works on: (M tile i, K row tile r, N split sp, its first
    stored row, whether K and N divide into whole tiles, nibble halves, accumulators)."""
    i, r, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    halves = 2 if p.packed else 1
    return (i, r, sp, pl.multiple_of(r * p.bk, p.bk), p.kd % p.bk == 0, p.n % p.bn == 0,
            halves, p.subs * halves)


def _accumulate_tile(p: _Plan, d_ref, z_ref, row0, col0, col_abs, rows_ok, cols_ok,
                     consume):
    """Decode the [bk, bn] code tile at (row0, col0) and hand each piece to `consume`.

    The tile is taken as `p.subs` sub-steps of `p.sub` rows (one scale block each) and,
    for 4-bit formats, two nibble halves per sub-step. `consume(values, sub_index, half,
    scale_row)` receives the decoded codes minus zero points as float32 [sub, bn] and the
    block index of their scale row (0 for per-channel operands).
    col0 is the column offset inside the refs' blocks, col_abs the tile's first column of
    W (for masks). rows_ok / cols_ok: whether loads need no row / column masks (static).
    """
    ri = jnp.arange(p.sub, dtype=jnp.int32)
    ci = col_abs + jnp.arange(p.bn, dtype=jnp.int32)
    for q in range(p.subs):
        r0 = row0 + q * p.sub
        mask = tile_mask(None if rows_ok else r0 + ri, p.kd, None if cols_ok else ci, p.n)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (p.sub, p.bn))
        codes = masked_load(d_ref.at[pl.ds(r0, p.sub), pl.ds(col0, p.bn)], mask,
                             d_ref.dtype)
        for w, half in _decode_tile(codes, p):
            blk = _row_block(r0, p, half)
            if p.has_zeros:
                zmask = None if cols_ok else (ci < p.n)[None, :]
                z = masked_load(z_ref.at[pl.ds(blk, 1), pl.ds(col0, p.bn)], zmask,
                                 z_ref.dtype)
                w = w - z.astype(jnp.float32)
            consume(w, q, half, blk)


def _scale_row(s_ref, blk, col0, col_abs, p: _Plan, cols_ok: bool):
    """The [1, bn] scale row `blk` at block column offset col0 (W column col_abs)."""
    mask = None if cols_ok else (col_abs + jnp.arange(p.bn, dtype=jnp.int32) < p.n)[None, :]
    return masked_load(s_ref.at[pl.ds(blk, 1), pl.ds(col0, p.bn)], mask, s_ref.dtype)


def _fwd_kernel(*refs, p: _Plan, decode: bool):
    """One [bm, bn] output tile: the sum over this program's K tiles of x_tile @ W_tile.

    Grid: decode (N tiles, K splits); tiled (M tiles, N tiles). x arrives zero-padded
    as [rows, X] where the high-nibble half (4-bit formats) starts at column X / 2.
    """
    x_ref, d_ref, s_ref, z_ref, o_ref = _with_zeros(refs, p)
    if decode:
        i, j, sp = 0, pl.program_id(0), pl.program_id(1)
    else:
        i, j, sp = pl.program_id(0), pl.program_id(1), 0
    col_abs = j * p.bn                         # the refs' blocks start at this column
    cols_ok = p.n % p.bn == 0
    rows_ok = p.split * p.steps * p.bk == p.kd
    x_half = p.split * p.steps * p.bk            # column of x where the high half starts
    xdt = x_ref.dtype

    def body(t, acc):
        row0 = pl.multiple_of((sp * p.steps + t) * p.bk, p.bk)
        parts = []

        def consume(w, q, half, blk):
            xo = row0 + q * p.sub + (x_half if half else 0)
            xt = x_ref[:, pl.ds(pl.multiple_of(xo, p.sub), p.sub)]
            part = jnp.dot(xt, w.astype(xdt), precision=_precision(xdt),
                           preferred_element_type=jnp.float32)
            if not p.per_channel:
                part = part * _scale_row(s_ref, blk, 0, col_abs, p, cols_ok)
            parts.append(part)

        _accumulate_tile(p, d_ref, z_ref, row0, 0, col_abs, rows_ok, cols_ok, consume)
        for part in parts:
            acc = acc + part
        return acc

    acc = lax.fori_loop(0, p.steps, body, jnp.zeros((p.bm, p.bn), jnp.float32))
    if p.per_channel:
        acc = acc * _scale_row(s_ref, 0, 0, col_abs, p, cols_ok)
    rows = i * p.bm + jnp.arange(p.bm, dtype=jnp.int32)
    cols = col_abs + jnp.arange(p.bn, dtype=jnp.int32)
    mask = (rows < p.m)[:, None] & (cols < p.n)[None, :]
    plgpu.store(o_ref.at[:, :], acc.astype(o_ref.dtype), mask=mask)


def _t_kernel(*refs, p: _Plan):
    """One [bm, bk] (x2 for 4-bit formats) tile of dx: sum over N tiles of dy @ W_tile.T.

    Grid: (M tiles, K tiles of stored rows, N splits). dy arrives zero-padded as [rows, X].
    Per-block scales multiply the dy tile (they vary along N, the contracted axis).
    """
    dy_ref, d_ref, s_ref, z_ref, o_ref = _with_zeros(refs, p)
    i, r, sp, row0, rows_ok, cols_ok, halves, n_acc = _t_geometry(p)
    ddt = dy_ref.dtype

    def body(t, accs):
        col0 = pl.multiple_of((sp * p.steps + t) * p.bn, p.bn)
        dyt = dy_ref[:, pl.ds(col0, p.bn)]
        accs = list(accs)

        def consume(w, q, half, blk):
            s = _scale_row(s_ref, blk, col0, col0, p, cols_ok)
            g = (dyt.astype(jnp.float32) * s).astype(ddt)
            part = lax.dot_general(g, w.astype(ddt), (((1,), (1,)), ((), ())),
                                   precision=_precision(ddt),
                                   preferred_element_type=jnp.float32)
            accs[q * halves + half] = accs[q * halves + half] + part

        _accumulate_tile(p, d_ref, z_ref, row0, col0, col0, rows_ok, cols_ok, consume)
        return tuple(accs)

    init = tuple(jnp.zeros((p.bm, p.sub), jnp.float32) for _ in range(n_acc))
    accs = lax.fori_loop(0, p.steps, body, init)
    rows = i * p.bm + jnp.arange(p.bm, dtype=jnp.int32)
    for q in range(p.subs):
        for half in range(halves):
            k0 = row0 + q * p.sub + (p.half_rows if half else 0)
            ks = k0 + jnp.arange(p.sub, dtype=jnp.int32)
            mask = (rows < p.m)[:, None] & (ks < p.k)[None, :]
            if half == 0 and p.packed:
                mask = mask & (ks < p.half_rows)[None, :]
            plgpu.store(o_ref.at[:, pl.ds(k0, p.sub)],
                        accs[q * halves + half].astype(o_ref.dtype), mask=mask)


# --------------------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------------------


def _weight_specs(op: QOperand, p: _Plan, col_block: bool, index):
    """BlockSpecs for data, scales(, zeros): all rows; columns blocked by bn or whole."""
    kd, n = p.kd, p.n
    cols = p.bn if col_block else n
    specs = [pl.BlockSpec((kd, cols), index), pl.BlockSpec((p.nb, cols), index)]
    args = [op.data, op.scales]
    if p.has_zeros:
        specs.append(pl.BlockSpec((p.nb, cols), index))
        args.append(op.zeros)
    return specs, args


def _pad_activation(a, rows: int, width: int, p: _Plan, split_halves: bool):
    """Zero-pad a [M, L] activation to [rows, width]; 4-bit: lay out the two halves.

    For 4-bit formats (split_halves) x [M, K] is padded to the operand's Kp, cut at Kp/2
    into the low- and high-nibble halves, and each half zero-padded to width / 2, so the
    kernel finds logical row Kp/2 + i at column width/2 + i.
    """
    m, length = a.shape
    if split_halves:
        hp = p.half_rows
        a = jnp.pad(a, ((0, rows - m), (0, 2 * hp - length)))
        a = a.reshape(rows, 2, hp)
        a = jnp.pad(a, ((0, 0), (0, 0), (0, width // 2 - hp)))
        return a.reshape(rows, width)
    return jnp.pad(a, ((0, rows - m), (0, width - length)))


def _fwd_layout(m: int, p: _Plan):
    """(decode, padded rows of x, x width, grid, at) of a forward launch: decode is one
    program per (N tile, K split) over 16 padded rows, tiled one per (M tile, N tile).
    `at(f)` turns an index map written on (i, j, s) (M tile, N tile, K split) into the
    grid's own."""
    span = p.split * p.steps * p.bk              # x columns per nibble half
    width = 2 * span if p.packed else span
    n_tiles = pl.cdiv(p.n, p.bn)
    if m <= DECODE_M:
        return True, p.bm, width, (n_tiles, p.split), lambda f: (lambda j, s: f(0, j, s))
    m_tiles = pl.cdiv(m, p.bm)
    return (False, m_tiles * p.bm, width, (m_tiles, n_tiles),
            lambda f: (lambda i, j: f(i, j, 0)))


def _forward(x, op: QOperand, p: _Plan, interpret: bool):
    m = x.shape[0]
    decode, rows, width, grid, at = _fwd_layout(m, p)
    x_spec = pl.BlockSpec((p.bm, width), at(lambda i, j, s: (i, 0)))
    w_index = at(lambda i, j, s: (0, j))
    if decode and p.split > 1:
        out_shape = jax.ShapeDtypeStruct((p.split, m, p.n), jnp.float32)
        out_spec = pl.BlockSpec((None, p.bm, p.bn), at(lambda i, j, s: (s, 0, j)))
    else:
        out_shape = jax.ShapeDtypeStruct((m, p.n), x.dtype)
        out_spec = pl.BlockSpec((p.bm, p.bn), at(lambda i, j, s: (i, j)))
    name = f"qmatmul_triton_{'decode' if decode else 'tiled'}"
    xp = _pad_activation(x, rows, width, p, p.packed)
    w_specs, w_args = _weight_specs(op, p, True, w_index)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p, decode=decode),
        grid=grid,
        in_specs=[x_spec, *w_specs],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params(p),
        interpret=interpret,
        name=name,
    )(xp, *w_args)
    if decode and p.split > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out


def _transposed(dy, op: QOperand, p: _Plan, interpret: bool):
    m = dy.shape[0]
    m_tiles = pl.cdiv(m, p.bm)
    rows = m_tiles * p.bm
    width = p.split * p.steps * p.bn
    dyp = _pad_activation(dy, rows, width, p, False)
    grid = (m_tiles, pl.cdiv(p.kd, p.bk), p.split)
    w_specs, w_args = _weight_specs(op, p, False, lambda i, r, s: (0, 0))
    if p.split > 1:
        out_shape = jax.ShapeDtypeStruct((p.split, m, p.k), jnp.float32)
        out_spec = pl.BlockSpec((None, p.bm, p.k), lambda i, r, s: (s, i, 0))
    else:
        out_shape = jax.ShapeDtypeStruct((m, p.k), dy.dtype)
        out_spec = pl.BlockSpec((p.bm, p.k), lambda i, r, s: (i, 0))
    out = pl.pallas_call(
        functools.partial(_t_kernel, p=p),
        grid=grid,
        in_specs=[pl.BlockSpec((p.bm, width), lambda i, r, s: (i, 0)), *w_specs],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params(p),
        interpret=interpret,
        name="qmatmul_t_triton",
    )(dyp, *w_args)
    if p.split > 1:
        out = out.sum(axis=0).astype(dy.dtype)
    return out


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul_triton(x: jax.Array, op: QOperand, config: MatmulConfig | None = None, *,
                   interpret: bool = False) -> jax.Array:
    """y[M, N] = x[M, K] @ W, W quantised; float32 accumulation, result in x's dtype.

    M <= 16 runs the decode kernel (split-K over a grid axis when config.split_k > 1),
    larger M the tiled kernel. `config` (a MatmulConfig) sets block_m / block_n /
    block_k (rows of stored data per K step), warps, stages and split_k; None takes
    `default_config("triton", M)` clamped to the problem. interpret=True runs the same
    kernels in Pallas's interpreter (any device; for tests).

    Raises ValueError for a K mismatch between x and W, an unsupported dtype, or a
    config whose block_k is neither a multiple nor a divisor of W's block size.
    """
    check_operand(op)
    check_activation(x, "x", op.k, "K")
    p = _plan(op, x.shape[0], config, transposed=False)
    return _forward(x, op, p, interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul_t_triton(dy: jax.Array, op: QOperand, config: MatmulConfig | None = None, *,
                     interpret: bool = False) -> jax.Array:
    """dx[M, K] = dy[M, N] @ W.T from the same stored W: the gradient of x @ W for x.

    No transposed or dequantised copy of W is made: each program decodes a [block_k,
    block_n] tile of the stored codes and contracts it with dy along N. config.split_k
    splits the N loop over a grid axis (float32 partials added outside), which gives a
    small-M backward pass more programs. Same config and errors as `qmatmul_triton`.
    """
    check_operand(op)
    check_activation(dy, "dy", op.n, "N")
    p = _plan(op, dy.shape[0], config, transposed=True)
    return _transposed(dy, op, p, interpret)


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------

forward = qmatmul_triton
transposed = qmatmul_t_triton

SPACE = dict(block_m=(32, 64, 128), block_n=(32, 64, 128, 256),
             block_k=(32, 64, 128, 256, 512), num_warps=(4, 8), num_stages=(2, 3, 4),
             split_k=(1, 2, 4, 8))
MAX_CONFIGS = 48


def smem_bytes(plan: _Plan, x_itemsize: int, data_itemsize: int, is_transposed: bool) -> int:
    """Shared memory Triton's software pipeline holds for one program: num_stages copies
    of the activation and code tiles per loop step. Forward: x [bm, bk] (two slices for
    4-bit formats) and codes [bk, bn]; transposed: dy [bm, bn] and codes [bk, bn]."""
    if is_transposed:
        act = plan.bm * plan.bn * x_itemsize
    else:
        act = (2 if plan.packed else 1) * plan.bm * plan.bk * x_itemsize
    codes = plan.bk * plan.bn * data_itemsize
    scales = 2 * plan.bn * 4
    return plan.num_stages * (act + codes + scales)


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """Triton's space: block_m (prefill only; decode tiles are 16 rows), block_n, block_k,
    num_warps, num_stages, split_k (decode and transposed kernels). Pruned: what `_plan`
    rejects, duplicates after clamping, tiles whose software pipeline needs more shared
    memory than the GPU has, and accumulators that would spill registers."""
    is_t = problem.kernel.endswith("_t")
    decode = problem.m <= DECODE_M
    limit, gpu = smem_limit(device_kind)
    x_size = jnp.dtype(problem.x_dtype).itemsize
    d_size = jnp.dtype(op.data.dtype).itemsize
    configs = _space.grid(space, **({"block_m": 16} if decode else {}),
                          **({} if (decode or is_t) else {"split_k": 1}))

    def prune(p):
        smem = smem_bytes(p, x_size, d_size, is_t)
        if smem > limit:
            return f"needs ~{smem >> 10} KiB of shared memory (> {limit >> 10} KiB on {gpu})"
        return register_pressure(p.bm, p.bn, p.num_warps)

    kept, pruned = _space.search(
        configs, lambda c: _plan(op, problem.m, c, transposed=is_t),
        lambda p: (p.bm, p.bn, p.bk, p.split, p.num_warps, p.num_stages), prune)
    return kept, pruned, default_config("triton", problem.m)
