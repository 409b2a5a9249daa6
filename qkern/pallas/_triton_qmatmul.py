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

from ..formats import Format
from ._config import DECODE_M, MatmulConfig, default_config
from ._decode import decode_nibbles, decode_unpacked, fp8_from_bits, split_nibbles
from ._operand import QOperand, reference_dequantize

__all__ = ["qmatmul_triton", "qmatmul_t_triton", "reference", "reference_t"]

_MIN_DOT = 16            # smallest M, N and K of a dot that Triton's MMA accepts
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------------------
# Plain-jnp references (what the kernels compute).
# --------------------------------------------------------------------------------------


def reference(x: jax.Array, op: QOperand) -> jax.Array:
    """x @ dequantise(W) in float32, returned in x's dtype: the meaning of `qmatmul_triton`.

    Materialises the whole dequantised weight; for tests and small problems only.
    """
    w = reference_dequantize(op)
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def reference_t(dy: jax.Array, op: QOperand) -> jax.Array:
    """dy @ dequantise(W).T in float32, in dy's dtype: the meaning of `qmatmul_t_triton`."""
    w = reference_dequantize(op)
    dx = jnp.dot(dy.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)
    return dx.astype(dy.dtype)


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
class _Plan:
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
    bm: int
    bn: int
    bk: int
    sub: int              # rows per scale block step inside a K tile (bk or B)
    steps: int            # loop trips per program (K tiles, or N tiles when transposed)
    split: int            # programs along the loop axis, their partials summed outside
    num_warps: int
    num_stages: int

    @property
    def per_channel(self) -> bool:
        return self.nb == 1

    @property
    def subs(self) -> int:
        return self.bk // self.sub


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _largest_pow2_divisor(v: int) -> int:
    return v & -v


def _check_operand(op: QOperand) -> None:
    if not isinstance(op, QOperand):
        raise TypeError(f"expected a QOperand (qkern.pallas._operand), got {type(op).__name__}")
    fmt, data = op.fmt, op.data
    if data.ndim != 2 or op.scales.ndim != 2:
        raise ValueError(f"QOperand data and scales must be 2-D; got data {data.shape}, "
                         f"scales {op.scales.shape}.")
    kd = op.k_padded // 2 if fmt.packed else op.k_padded
    if data.shape[0] != kd or op.scales.shape[1] != data.shape[1]:
        raise ValueError(
            f"{fmt.name} QOperand shapes disagree: data {data.shape}, scales "
            f"{op.scales.shape}, block_size {op.block_size} (expected data rows {kd}).")
    if op.zeros is not None and tuple(op.zeros.shape) != tuple(op.scales.shape):
        raise ValueError(f"zeros {op.zeros.shape} must have the scales' shape "
                         f"{op.scales.shape}.")
    if op.k > op.k_padded:
        raise ValueError(f"QOperand k={op.k} exceeds its padded rows {op.k_padded}.")
    if not op.halves_aligned:
        raise ValueError(
            f"{fmt.name} operand has {op.num_blocks} blocks: the high-nibble half must "
            "start on a block boundary (an even number of blocks, or one).")
    if fmt.packed and jnp.dtype(data.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"{fmt.name} data must be uint8 (two codes per byte); got "
                         f"{data.dtype}.")


def _check_activation(name: str, a, want: int, what: str) -> None:
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, {what}]; got shape {a.shape}.")
    if jnp.dtype(a.dtype) not in _DTYPES:
        raise ValueError(f"{name} dtype {a.dtype} is not supported; use float32, bfloat16 "
                         "or float16.")
    if a.shape[1] != want:
        raise ValueError(f"{name} has {what}={a.shape[1]} (shape {a.shape}) but the "
                         f"quantised weight has {what}={want}.")


def _plan(op: QOperand, m: int, config: MatmulConfig | None, *, transposed: bool) -> _Plan:
    """Validate `config` against the operand and clamp its blocks to the problem.

    A given config is checked strictly (block_k must be a multiple or a divisor of the
    block size; blocks must be powers of two, Triton's tensor rule); blocks larger than
    the problem are then shrunk, which changes no result. config=None starts from
    `default_config("triton", m)` and also picks a block_k that fits the block size.
    """
    fmt, B, nb = op.fmt, op.block_size, op.num_blocks
    kd, n = op.data.shape
    user = config is not None
    cfg = config if user else default_config("triton", m)
    if not isinstance(cfg, MatmulConfig):
        raise TypeError(f"config must be a MatmulConfig, got {type(cfg).__name__}")
    bk, bn, bm = cfg.block_k, cfg.block_n, cfg.block_m
    if nb > 1 and bk % B and B % bk:
        if user:
            raise ValueError(
                f"block_k={bk} is incompatible with the {fmt.name} operand's block_size "
                f"{B}: a K tile must not straddle a scale block, so block_k must be a "
                f"multiple or a divisor of {B}.")
        bk = _largest_pow2_divisor(B)
    for name, v in (("block_k", bk), ("block_n", bn), ("block_m", bm)):
        if not _pow2(v):
            raise ValueError(f"{name}={v} must be a power of two (Triton tensor sizes).")
    split = cfg.split_k if (transposed or m <= DECODE_M) else 1
    if transposed and not user and m <= DECODE_M:
        # The table's decode entry is tuned for the forward kernel. Here block_k is the
        # output tile's width and the grid has only Kd / block_k row tiles (8 for a
        # 4096-row int4 weight at 256): too few programs. Measured on an H100 (K = N =
        # 4096, M = 1, bf16): int4 57 -> 17 us, nf4 153 -> 31 us.
        bk, split = min(bk, 64), max(split, 8)
    # Clamp to the problem (never below the smallest dot Triton compiles).
    bn = max(_MIN_DOT, min(bn, _next_pow2(n)))
    bk = max(_MIN_DOT, min(bk, _next_pow2(kd)))
    bm = _MIN_DOT if m <= DECODE_M else max(_MIN_DOT, min(bm, _next_pow2(m)))
    sub = bk if nb == 1 else min(bk, B)
    if sub < _MIN_DOT:
        raise ValueError(
            f"{fmt.name} operand with block_size {B}: the Triton kernels need scale blocks "
            f"of at least {_MIN_DOT} rows (one dot per block); use the xla backend.")
    total = pl.cdiv(n, bn) if transposed else pl.cdiv(kd, bk)
    split = max(1, min(split, total))
    steps = pl.cdiv(total, split)
    split = pl.cdiv(total, steps)        # no program left without work
    return _Plan(
        fmt=fmt, packed=fmt.packed, m=m, k=op.k, kd=kd, n=n, nb=nb, block_size=B,
        half_rows=op.k_padded // 2 if fmt.packed else 0,
        half_blocks=nb // 2 if fmt.packed else 0,
        has_zeros=op.zeros is not None,
        fp8_bits=(jnp.issubdtype(op.data.dtype, jnp.floating)
                  and jnp.dtype(op.data.dtype).itemsize == 1 and not _native_fp8_convert()),
        bm=bm, bn=bn, bk=bk, sub=sub, steps=steps, split=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _compiler_params(p: _Plan):
    return plgpu.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)


# --------------------------------------------------------------------------------------
# Kernel pieces.
# --------------------------------------------------------------------------------------


def _precision(dtype):
    """float32 activations get IEEE float32 dots: Triton's default for them is TF32,
    which measured 2e-4 relative error on an H100 against a 2e-5 tolerance."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _masked_load(view, mask, dtype):
    """Load `view`; where `mask` is False read 0 (no mask: a plain load)."""
    if mask is None:
        return view[...]
    return plgpu.load(view, mask=mask, other=jnp.zeros((), dtype))


def _row_block(row0, p: _Plan, half: int):
    """Scale row for a step starting at stored row `row0` of the given nibble half.

    Clamped so that a step past the stored rows (whose codes are masked to 0 and meet
    zero activations) still reads a real, finite scale row.
    """
    if p.per_channel:
        return 0
    blk = lax.div(row0, p.block_size) + (p.half_blocks if half else 0)
    return jnp.minimum(blk, p.nb - 1)


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
        mask = None
        if not (rows_ok and cols_ok):
            mask = jnp.ones((p.sub, p.bn), jnp.bool_)
            if not rows_ok:
                mask = mask & ((r0 + ri) < p.kd)[:, None]
            if not cols_ok:
                mask = mask & (ci < p.n)[None, :]
        codes = _masked_load(d_ref.at[pl.ds(r0, p.sub), pl.ds(col0, p.bn)], mask,
                             d_ref.dtype)
        for w, half in _decode_tile(codes, p):
            blk = _row_block(r0, p, half)
            if p.has_zeros:
                zmask = None if cols_ok else (ci < p.n)[None, :]
                z = _masked_load(z_ref.at[pl.ds(blk, 1), pl.ds(col0, p.bn)], zmask,
                                 z_ref.dtype)
                w = w - z.astype(jnp.float32)
            consume(w, q, half, blk)


def _scale_row(s_ref, blk, col0, col_abs, p: _Plan, cols_ok: bool):
    """The [1, bn] scale row `blk` at block column offset col0 (W column col_abs)."""
    mask = None if cols_ok else (col_abs + jnp.arange(p.bn, dtype=jnp.int32) < p.n)[None, :]
    return _masked_load(s_ref.at[pl.ds(blk, 1), pl.ds(col0, p.bn)], mask, s_ref.dtype)


def _fwd_kernel(*refs, p: _Plan, decode: bool):
    """One [bm, bn] output tile: the sum over this program's K tiles of x_tile @ W_tile.

    Grid: decode (N tiles, K splits); tiled (M tiles, N tiles). x arrives zero-padded
    as [rows, X] where the high-nibble half (4-bit formats) starts at column X / 2.
    """
    if p.has_zeros:
        x_ref, d_ref, s_ref, z_ref, o_ref = refs
    else:
        x_ref, d_ref, s_ref, o_ref = refs
        z_ref = None
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
    if p.has_zeros:
        dy_ref, d_ref, s_ref, z_ref, o_ref = refs
    else:
        dy_ref, d_ref, s_ref, o_ref = refs
        z_ref = None
    i, r, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row0 = pl.multiple_of(r * p.bk, p.bk)
    rows_ok = p.kd % p.bk == 0
    cols_ok = p.n % p.bn == 0
    ddt = dy_ref.dtype
    halves = 2 if p.packed else 1
    n_acc = p.subs * halves

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


def _forward(x, op: QOperand, p: _Plan, interpret: bool):
    m = x.shape[0]
    span = p.split * p.steps * p.bk              # x columns per nibble half
    width = 2 * span if p.packed else span
    decode = m <= DECODE_M
    n_tiles = pl.cdiv(p.n, p.bn)
    if decode:
        rows = p.bm
        grid = (n_tiles, p.split)
        x_spec = pl.BlockSpec((rows, width), lambda j, s: (0, 0))
        w_index = lambda j, s: (0, j)
        if p.split > 1:
            out_shape = jax.ShapeDtypeStruct((p.split, m, p.n), jnp.float32)
            out_spec = pl.BlockSpec((None, p.bm, p.bn), lambda j, s: (s, 0, j))
        else:
            out_shape = jax.ShapeDtypeStruct((m, p.n), x.dtype)
            out_spec = pl.BlockSpec((p.bm, p.bn), lambda j, s: (0, j))
        name = "qmatmul_triton_decode"
    else:
        m_tiles = pl.cdiv(m, p.bm)
        rows = m_tiles * p.bm
        grid = (m_tiles, n_tiles)
        x_spec = pl.BlockSpec((p.bm, width), lambda i, j: (i, 0))
        w_index = lambda i, j: (0, j)
        out_shape = jax.ShapeDtypeStruct((m, p.n), x.dtype)
        out_spec = pl.BlockSpec((p.bm, p.bn), lambda i, j: (i, j))
        name = "qmatmul_triton_tiled"
    xp = _pad_activation(x, rows, width, p, p.packed)
    w_specs, w_args = _weight_specs(op, p, True, w_index)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p, decode=decode),
        grid=grid,
        in_specs=[x_spec, *w_specs],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=_compiler_params(p),
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
        compiler_params=_compiler_params(p),
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
    _check_operand(op)
    _check_activation("x", x, op.k, "K")
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
    _check_operand(op)
    _check_activation("dy", dy, op.n, "N")
    p = _plan(op, dy.shape[0], config, transposed=True)
    return _transposed(dy, op, p, interpret)
