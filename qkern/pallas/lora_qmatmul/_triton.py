"""Fused QLoRA matmul for NVIDIA GPUs: one Pallas kernel lowered through Triton.

    y, xu = lora_qmatmul_triton(x, op, u, v, scale, config, transposed=False, interpret=False)

computes, with W the quantised [K, N] weight of `op` (a `QOperand`, see `_operand.py`),

    forward     y[M, N] = x[M, K] @ W   + scale * (x @ u[K, r]) @ v[r, N]
    transposed  y[M, K] = x[M, N] @ W.T + scale * (x @ u[N, r]) @ v[r, K]

and returns xu = x @ u as float32 [M, r] too (the backward pass needs it for dv).

Each x tile is loaded once and used for both products: inside the contraction loop a
program accumulates the base tile `x_tile @ decode(W_tile)` and the projection
`x_tile @ u_tile` (u laid out exactly like x's columns, so the same offset finds both);
after the loop it adds `scale * xu @ v[:, its output columns]`. Everything else (grids,
tile plans, masks, the 4-bit two-halves layout, per-block scales applied to the dot result
or to the dy tile) is the weight-only kernels' (`qmatmul/_triton.py`), whose helpers this
module imports.

Kernels (chosen as in `qmatmul/_triton.py`)

* decode (forward, M <= 16): grid (N tiles, K splits), x padded to 16 rows.
* tiled (forward, M > 16): grid (M tiles, N tiles).
* transposed: grid (M tiles, K tiles of the stored rows, N splits), the N loop inside.

Every program along the non-contracted output axis (N tiles forward, K tiles transposed)
recomputes the projection of its own rows: that costs r_pad / block_n (forward) or
r_pad / block_k (transposed) of the base dot's MMA work and nothing in memory traffic,
which is what bounds decode. Only the first such program stores xu.

Split-K (decode forward) and the transposed kernel's split over N: each split sums its own
range of the contraction into float32 partials of both y and xu. The LoRA term is linear
in xu, so each split adds `scale * xu_partial @ v` to its y partial; the partials of y and
of xu are summed outside the kernel, and the sums are exact.

Precision: the in-loop projection dot runs in x's dtype (u is cast to it, as decoded W
tiles are), with float32 accumulation (IEEE float32 dots for float32 x); the epilogue
`xu @ v` runs once per program in float32. r is zero-padded to a power of two >= 16
(Triton's smallest dot); the padding adds exact zeros.

Example:

    op = canonical_operand(qkern.quantize(w, "nf4"))
    y, xu = lora_qmatmul_triton(x, op, a, b, alpha / rank, None, transposed=False,
                                interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._config import MatmulConfig
from .._operand import QOperand
from .._triton_common import MIN_DOT, compiler_params, next_pow2
from ..qmatmul._triton import (_Plan, _accumulate_tile, _pad_activation, _plan, _precision,
                              _fwd_layout, _scale_row, _t_geometry, _weight_specs,
                              _with_zeros)
from ..qmatmul import _triton as qmatmul_triton
from ..qmatmul.base import check_activation, check_operand
from .base import check_factors

__all__ = ["lora_qmatmul_triton"]

_F32 = jnp.float32


def _rank_pad(r: int) -> int:
    return max(MIN_DOT, next_pow2(r))


def _store_rows(o_ref, val, row0, m, extra=None):
    """Masked store of a [rows, cols] tile into o_ref (all its columns), rows < m only."""
    rows = row0 + jnp.arange(val.shape[0], dtype=jnp.int32)
    mask = (rows < m)[:, None] & jnp.ones((1, val.shape[1]), jnp.bool_)
    if extra is not None:
        mask = mask & extra
    plgpu.store(o_ref.at[:, :], val.astype(o_ref.dtype), mask=mask)


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


def _fwd_kernel(*refs, p: _Plan, decode: bool, scale: float):
    """One [bm, bn] tile of y and (from the first N tile) the [bm, rp] rows of xu.

    x arrives zero-padded as [rows, X] (the high-nibble half at column X / 2 for 4-bit
    formats) and u as [X, rp] with its rows in the same order, so x columns c and u rows c
    meet. v is [rp, N] float32, zero rows past r.
    """
    x_ref, d_ref, s_ref, z_ref, u_ref, v_ref, o_ref, xu_ref = _with_zeros(refs, p)
    if decode:
        i, j, sp = 0, pl.program_id(0), pl.program_id(1)
    else:
        i, j, sp = pl.program_id(0), pl.program_id(1), 0
    col_abs = j * p.bn
    cols_ok = p.n % p.bn == 0
    rows_ok = p.split * p.steps * p.bk == p.kd
    x_half = p.split * p.steps * p.bk
    xdt = x_ref.dtype
    rp = u_ref.shape[1]

    def body(t, carry):
        acc, xu = carry
        row0 = pl.multiple_of((sp * p.steps + t) * p.bk, p.bk)
        parts, projs = [], []

        def consume(w, q, half, blk):
            xo = pl.multiple_of(row0 + q * p.sub + (x_half if half else 0), p.sub)
            xt = x_ref[:, pl.ds(xo, p.sub)]                  # the one load of this x tile
            part = jnp.dot(xt, w.astype(xdt), precision=_precision(xdt),
                           preferred_element_type=_F32)
            if not p.per_channel:
                part = part * _scale_row(s_ref, blk, 0, col_abs, p, cols_ok)
            parts.append(part)
            projs.append(jnp.dot(xt, u_ref[pl.ds(xo, p.sub), :], precision=_precision(xdt),
                                 preferred_element_type=_F32))

        _accumulate_tile(p, d_ref, z_ref, row0, 0, col_abs, rows_ok, cols_ok, consume)
        for part in parts:
            acc = acc + part
        for proj in projs:
            xu = xu + proj
        return acc, xu

    init = (jnp.zeros((p.bm, p.bn), _F32), jnp.zeros((p.bm, rp), _F32))
    acc, xu = lax.fori_loop(0, p.steps, body, init)
    if p.per_channel:
        acc = acc * _scale_row(s_ref, 0, 0, col_abs, p, cols_ok)
    acc = acc + jnp.dot(xu * scale, v_ref[...], precision=lax.Precision.HIGHEST,
                        preferred_element_type=_F32)
    rows = i * p.bm + jnp.arange(p.bm, dtype=jnp.int32)
    cols = col_abs + jnp.arange(p.bn, dtype=jnp.int32)
    plgpu.store(o_ref.at[:, :], acc.astype(o_ref.dtype),
                mask=(rows < p.m)[:, None] & (cols < p.n)[None, :])
    _store_rows(xu_ref, xu, i * p.bm, p.m, extra=j == 0)


def _t_kernel(*refs, p: _Plan, scale: float):
    """One [bm, bk] (x2 for 4-bit formats) tile of y = x @ W.T + scale * (x @ u) @ v and,
    from the first K tile, the [bm, rp] rows of xu.

    x (dy in the weight-only kernel) is [rows, X] zero-padded along N, u [X, rp] likewise;
    v is [rp, V] float32 indexed by logical K (so the high nibble half's columns start at
    Kp / 2), zero past K.
    """
    x_ref, d_ref, s_ref, z_ref, u_ref, v_ref, o_ref, xu_ref = _with_zeros(refs, p)
    i, r, sp, row0, rows_ok, cols_ok, halves, n_acc = _t_geometry(p)
    xdt = x_ref.dtype
    rp = u_ref.shape[1]

    def body(t, carry):
        accs, xu = list(carry[:-1]), carry[-1]
        col0 = pl.multiple_of((sp * p.steps + t) * p.bn, p.bn)
        xt = x_ref[:, pl.ds(col0, p.bn)]                     # the one load of this x tile
        xu = xu + jnp.dot(xt, u_ref[pl.ds(col0, p.bn), :], precision=_precision(xdt),
                          preferred_element_type=_F32)

        def consume(w, q, half, blk):
            s = _scale_row(s_ref, blk, col0, col0, p, cols_ok)
            g = (xt.astype(_F32) * s).astype(xdt)
            part = lax.dot_general(g, w.astype(xdt), (((1,), (1,)), ((), ())),
                                   precision=_precision(xdt), preferred_element_type=_F32)
            accs[q * halves + half] = accs[q * halves + half] + part

        _accumulate_tile(p, d_ref, z_ref, row0, col0, col0, rows_ok, cols_ok, consume)
        return (*accs, xu)

    init = tuple(jnp.zeros((p.bm, p.sub), _F32) for _ in range(n_acc))
    *accs, xu = lax.fori_loop(0, p.steps, body, (*init, jnp.zeros((p.bm, rp), _F32)))
    xus = xu * scale
    rows = i * p.bm + jnp.arange(p.bm, dtype=jnp.int32)
    for q in range(p.subs):
        for half in range(halves):
            k0 = row0 + q * p.sub + (p.half_rows if half else 0)
            vt = v_ref[:, pl.ds(k0, p.sub)]
            out = accs[q * halves + half] + jnp.dot(xus, vt, precision=lax.Precision.HIGHEST,
                                                    preferred_element_type=_F32)
            ks = k0 + jnp.arange(p.sub, dtype=jnp.int32)
            mask = (rows < p.m)[:, None] & (ks < p.k)[None, :]
            if half == 0 and p.packed:
                mask = mask & (ks < p.half_rows)[None, :]
            plgpu.store(o_ref.at[:, pl.ds(k0, p.sub)], out.astype(o_ref.dtype), mask=mask)
    _store_rows(xu_ref, xu, i * p.bm, p.m, extra=r == 0)


# --------------------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------------------


def _rows_like_x(u, rp: int, width: int, p: _Plan, split_halves: bool, dtype):
    """u [L, r] -> [width, rp] in x's padded column order (zero rows / columns added)."""
    ut = _pad_activation(u.T.astype(dtype), rp, width, p, split_halves)
    return ut.T


def _forward(x, op: QOperand, u, v, scale: float, p: _Plan, interpret: bool):
    m, r = x.shape[0], u.shape[1]
    rp = _rank_pad(r)
    decode, rows, width, grid, at = _fwd_layout(m, p)
    up = _rows_like_x(u, rp, width, p, p.packed, x.dtype)
    vp = jnp.pad(v.astype(_F32), ((0, rp - r), (0, 0)))
    x_spec = pl.BlockSpec((p.bm, width), at(lambda i, j, s: (i, 0)))
    u_spec = pl.BlockSpec((width, rp), at(lambda i, j, s: (0, 0)))
    v_spec = pl.BlockSpec((rp, p.bn), at(lambda i, j, s: (0, j)))
    w_index = at(lambda i, j, s: (0, j))
    if decode and p.split > 1:       # float32 partials of y and xu per split, summed below
        out_shape = [jax.ShapeDtypeStruct((p.split, m, p.n), _F32),
                     jax.ShapeDtypeStruct((p.split, m, rp), _F32)]
        out_specs = [pl.BlockSpec((None, p.bm, p.bn), at(lambda i, j, s: (s, 0, j))),
                     pl.BlockSpec((None, p.bm, rp), at(lambda i, j, s: (s, 0, 0)))]
    else:
        out_shape = [jax.ShapeDtypeStruct((m, p.n), x.dtype),
                     jax.ShapeDtypeStruct((m, rp), _F32)]
        out_specs = [pl.BlockSpec((p.bm, p.bn), at(lambda i, j, s: (i, j))),
                     pl.BlockSpec((p.bm, rp), at(lambda i, j, s: (i, 0)))]
    name = f"lora_qmatmul_triton_{'decode' if decode else 'tiled'}"
    xp = _pad_activation(x, rows, width, p, p.packed)
    w_specs, w_args = _weight_specs(op, p, True, w_index)
    y, xu = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p, decode=decode, scale=scale),
        grid=grid,
        in_specs=[x_spec, *w_specs, u_spec, v_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(p),
        interpret=interpret,
        name=name,
    )(xp, *w_args, up, vp)
    if decode and p.split > 1:
        y, xu = y.sum(axis=0).astype(x.dtype), xu.sum(axis=0)
    return y, xu[:, :r]


def _transposed(x, op: QOperand, u, v, scale: float, p: _Plan, interpret: bool):
    m, r = x.shape[0], u.shape[1]
    rp = _rank_pad(r)
    m_tiles = pl.cdiv(m, p.bm)
    rows = m_tiles * p.bm
    width = p.split * p.steps * p.bn
    xp = _pad_activation(x, rows, width, p, False)
    up = _rows_like_x(u, rp, width, p, False, x.dtype)
    # v's columns are read at the output's logical K offsets: the last K tile of the low
    # (or only) half may reach past K, as may the high half's, which starts at Kp / 2.
    v_width = (p.half_rows if p.packed else 0) + pl.cdiv(p.kd, p.bk) * p.bk
    vp = jnp.pad(v.astype(_F32), ((0, rp - r), (0, v_width - v.shape[1])))
    grid = (m_tiles, pl.cdiv(p.kd, p.bk), p.split)
    w_specs, w_args = _weight_specs(op, p, False, lambda i, k, s: (0, 0))
    if p.split > 1:
        out_shape = [jax.ShapeDtypeStruct((p.split, m, p.k), _F32),
                     jax.ShapeDtypeStruct((p.split, m, rp), _F32)]
        out_specs = [pl.BlockSpec((None, p.bm, p.k), lambda i, k, s: (s, i, 0)),
                     pl.BlockSpec((None, p.bm, rp), lambda i, k, s: (s, i, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((m, p.k), x.dtype),
                     jax.ShapeDtypeStruct((m, rp), _F32)]
        out_specs = [pl.BlockSpec((p.bm, p.k), lambda i, k, s: (i, 0)),
                     pl.BlockSpec((p.bm, rp), lambda i, k, s: (i, 0))]
    y, xu = pl.pallas_call(
        functools.partial(_t_kernel, p=p, scale=scale),
        grid=grid,
        in_specs=[pl.BlockSpec((p.bm, width), lambda i, k, s: (i, 0)), *w_specs,
                  pl.BlockSpec((width, rp), lambda i, k, s: (0, 0)),
                  pl.BlockSpec((rp, v_width), lambda i, k, s: (0, 0))],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(p),
        interpret=interpret,
        name="lora_qmatmul_t_triton",
    )(xp, *w_args, up, vp)
    if p.split > 1:
        y, xu = y.sum(axis=0).astype(x.dtype), xu.sum(axis=0)
    return y, xu[:, :r]


@functools.partial(jax.jit, static_argnames=("scale", "config", "transposed", "interpret"))
def _lora_triton(x, op, u, v, scale, config, transposed, interpret):
    p = _plan(op, x.shape[0], config, transposed=transposed)
    if transposed:
        return _transposed(x, op, u, v, scale, p, interpret)
    return _forward(x, op, u, v, scale, p, interpret)


def lora_qmatmul_triton(x2: jax.Array, op: QOperand, u: jax.Array, v: jax.Array,
                        scale: float, config: MatmulConfig | None = None, *,
                        transposed: bool = False, interpret: bool = False):
    """(y, xu) with y = x2 @ W + scale * (x2 @ u) @ v (W.T when transposed), xu = x2 @ u.

    x2: [M, din] float32 / bfloat16 / float16 (din = K, or N when transposed); op: the
    QOperand of the stored W [K, N]; u [din, r], v [r, dout] float; scale: a Python float.
    y is in x2's dtype (float32 accumulation), xu float32 [M, r]. `config` as for
    `qmatmul_triton` (block_k: stored rows per K step; split_k: K splits of the decode
    kernel, N splits of the transposed one); None: the heuristic table's.

    Raises ValueError for shape mismatches between x2, W, u and v, unsupported dtypes, and
    configs the weight-only kernels refuse.
    """
    check_operand(op)
    din, dout = (op.n, op.k) if transposed else (op.k, op.n)
    check_activation(x2, "x", din, "N" if transposed else "K")
    check_factors(u, v, din, dout, "lora_qmatmul_triton")
    return _lora_triton(x2, op, u, v, float(scale), config, bool(transposed), interpret)


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------

forward = lora_qmatmul_triton
SPACE = qmatmul_triton.SPACE
MAX_CONFIGS = qmatmul_triton.MAX_CONFIGS


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """The fused kernel tiles W with qmatmul's planner (`_plan`): qmatmul's Triton space
    for the same direction."""
    kernel = "qmatmul_t" if problem.kernel == "lora_t" else "qmatmul"
    return qmatmul_triton.candidates(dataclasses.replace(problem, kernel=kernel), op, space,
                                     device_kind)
