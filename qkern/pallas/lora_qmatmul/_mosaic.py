"""Fused QLoRA matmul for TPUs: one Pallas kernel lowered through Mosaic.

    y, xu = lora_qmatmul_mosaic(x, op, u, v, scale, config, transposed=False, interpret=False)

computes, with W the quantised [K, N] weight of `op` (a `QOperand`, see `_operand.py`),

    forward     y[M, N] = x[M, K] @ W   + scale * (x @ u[K, r]) @ v[r, N]
    transposed  y[M, K] = x[M, N] @ W.T + scale * (x @ u[N, r]) @ v[r, K]

and xu = x @ u as float32 [M, r] (the backward pass reuses it).

The kernels are the weight-only ones of `qmatmul/_mosaic.py` (same grids, tile plans,
VMEM dequantisation, 4-bit streams, float8 bit decoding; its helpers are imported) with
the LoRA factors riding along: each grid step's x tile (one per K stream) is loaded from
VMEM once and fed to both MXU dots, `x @ dequant(W_tile)` and `x @ u_tile` (u laid out in
x's padded stream order, so the same block index finds both); at the last step of the
contraction the output tile gets `scale * xu @ v_tile` (a float32 dot, once per tile).

Who computes xu. The projection depends on the output rows only, not on the output column
tile, so programs along the output-column axis (N tiles forward, K tiles transposed) would
all compute the same [M tile, r] result. Two modes:

* shared (several M tiles): the output-column axis and the contraction axis are
  "arbitrary" (sequential on one core; the M axis stays "parallel" for megacore). The first
  column tile accumulates xu into its output block, which stays resident in VMEM across
  the column tiles (its block index depends only on the M tile), and the later column tiles
  read it: no recomputation.
* per tile (one M tile: decode, and small M): every column tile computes its own xu into
  its own [M tile, r] slice of a [tiles, M, r] output (a few KiB) so the column axis stays
  "parallel"; the wrapper keeps the first slice. The extra MXU work is r_pad / block_n of
  the base dot, and decode is bound by weight bytes.

r is zero-padded to a multiple of 128 (the lane width, so u, v and xu blocks are
(8, 128)-legal and the dots lane-aligned); the padding adds exact zeros. u is cast to the
kernel's compute dtype (bfloat16 for bfloat16 x, else float32), like the dequantised W
tiles; xu accumulates and the epilogue runs in float32.

Example:

    op = canonical_operand(qkern.quantize(w, "nf4"))
    y, xu = lora_qmatmul_mosaic(x, op, a, b, alpha / rank, None, transposed=False,
                                interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import _space
from .._mosaic_common import LANES, VMEM_MAX, accumulate, compiler_params, round_up
from .._config import DECODE_M, MatmulConfig, default_config
from ..qmatmul import _mosaic as qmatmul_mosaic
from ..qmatmul._mosaic import (_Plan, _check_operand, _dequantise_tile, _dot_precision,
                              _kernel_activation, _pad_activation, _split_refs,
                              _weight_inputs, plan_mosaic)
from .._operand import QOperand
from ..qmatmul.base import check_activation
from .base import check_factors

__all__ = ["lora_qmatmul_mosaic", "plan_lora_mosaic"]

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _LoraPlan:
    base: _Plan              # the weight-only kernel's tiling (vmem_bytes includes LoRA's)
    rp: int                  # r padded to a multiple of 128
    shared: bool             # xu computed once per M tile and shared (see module doc)
    semantics: tuple


def plan_lora_mosaic(op: QOperand, m: int, dtype, r: int, config: MatmulConfig | None = None,
                     *, transposed: bool = False) -> _LoraPlan:
    """The tiling of the fused kernel: `plan_mosaic`'s, plus the rank padding, the xu mode
    and the grid's dimension semantics."""
    base = plan_mosaic(op, m, dtype, config, kernel="transposed" if transposed else None)
    rp = round_up(r, LANES)
    shared = base.mp // base.bm > 1
    cdt = jnp.dtype(base.compute_dtype).itemsize
    s = base.streams
    if transposed:       # u [bn, rp], v per stream [rp, tx], xu [bm, rp]
        extra = 2 * (base.bn * rp * cdt + s * rp * base.tx * 4 + base.bm * rp * 4)
    else:                # u per stream [tx, rp], v [rp, bn], xu [bm, rp]
        extra = 2 * (s * base.tx * rp * cdt + rp * base.bn * 4 + base.bm * rp * 4)
    est = base.vmem_bytes + extra
    if est > VMEM_MAX:
        raise ValueError(f"the fused LoRA tiling needs about {est >> 20} MiB of VMEM (> "
                         f"{VMEM_MAX >> 20}); use smaller block_k / block_n / block_m.")
    if base.kernel == "decode":
        semantics = ("parallel", "arbitrary")
    elif shared:
        semantics = ("parallel", "arbitrary", "arbitrary")
    else:
        semantics = ("parallel", "parallel", "arbitrary")
    return _LoraPlan(dataclasses.replace(base, vmem_bytes=est), rp, shared, semantics)


# --------------------------------------------------------------------------------------
# Kernel bodies
# --------------------------------------------------------------------------------------

def _project(xu_ref, xs, u_refs, own, step, cdt, prec):
    """xu += sum over streams of x_s @ u_s (xu = that at step 0), if `own`."""
    def update():
        part = None
        for x, u_ref in zip(xs, u_refs):
            d = jnp.dot(x, u_ref[...].astype(cdt), preferred_element_type=_F32, precision=prec)
            part = d if part is None else part + d

        accumulate(xu_ref, part, step, None)

    if own is True:
        update()
    else:
        pl.when(own)(update)


def _lora_term(xu_ref, v, scale):
    return jnp.dot(xu_ref[...] * scale, v, preferred_element_type=_F32,
                   precision=jax.lax.Precision.HIGHEST)


def _finish(acc_ref, part, step, last, write):
    """Accumulate `part` over the contraction steps; write(total) at the last one."""
    if acc_ref is None:
        write(part)
    else:
        accumulate(acc_ref, part, step, last, write)


def _fwd_kernel(*refs, lp: _LoraPlan, fmt, has_zeros: bool, scale: float):
    """One (M tile, N tile, K tile) step (decode: no M axis) of y = x @ W + s * xu @ v."""
    plan = lp.base
    s = plan.streams
    ns = s if plan.scale_mode == "tiled" else 1
    decode = plan.kernel == "decode"
    x_refs, (w_ref,), s_refs, z_refs, u_refs, (v_ref,), (o_ref, xu_ref), wq_refs, acc = \
        _split_refs(refs, (s, 1, ns, ns if has_zeros else 0, s, 1, 2, s,
                           1 if plan.nk > 1 else 0))
    k_axis = 1 if decode else 2
    j, k = pl.program_id(k_axis - 1), pl.program_id(k_axis)
    rows_valid = plan.kd - k * plan.td if plan.mask_k else None
    _dequantise_tile(plan, fmt, w_ref, s_refs, z_refs, wq_refs, rows_valid=rows_valid)
    cdt = wq_refs[0].dtype
    prec = _dot_precision(plan)
    xs = [x_ref[...].astype(cdt) for x_ref in x_refs]       # each x tile, loaded once
    part = None
    for x, wq in zip(xs, wq_refs):
        d = jnp.dot(x, wq[...], preferred_element_type=_F32, precision=prec)
        part = d if part is None else part + d
    _project(xu_ref, xs, u_refs, (j == 0) if lp.shared else True, k, cdt, prec)

    def write(total):
        o_ref[...] = (total + _lora_term(xu_ref, v_ref[...], scale)).astype(o_ref.dtype)

    _finish(acc[0] if acc else None, part, k, plan.nk - 1, write)


def _t_kernel(*refs, lp: _LoraPlan, fmt, has_zeros: bool, n: int, scale: float):
    """One (M tile, K tile, N tile) step of y = x @ W.T + s * xu @ v; N is contracted."""
    plan = lp.base
    s = plan.streams
    ns = s if plan.scale_mode == "tiled" else 1
    (x_ref,), (w_ref,), s_refs, z_refs, (u_ref,), v_refs, o_refs, (xu_ref,), wq_refs, accs = \
        _split_refs(refs, (1, 1, ns, ns if has_zeros else 0, 1, s, s, 1, s,
                           s if plan.nn > 1 else 0))
    k, j = pl.program_id(1), pl.program_id(2)
    cols_valid = n - j * plan.bn if plan.mask_n else None
    _dequantise_tile(plan, fmt, w_ref, s_refs, z_refs, wq_refs, cols_valid=cols_valid)
    cdt = wq_refs[0].dtype
    prec = _dot_precision(plan)
    x = x_ref[...].astype(cdt)                               # the x tile, loaded once
    _project(xu_ref, [x], [u_ref], (k == 0) if lp.shared else True, j, cdt, prec)
    for st in range(s):
        part = jax.lax.dot_general(x, wq_refs[st][...], (((1,), (1,)), ((), ())),
                                   preferred_element_type=_F32, precision=prec)

        def write(total, o_ref=o_refs[st], v_ref=v_refs[st]):
            o_ref[...] = (total + _lora_term(xu_ref, v_ref[...], scale)).astype(o_ref.dtype)

        _finish(accs[st] if accs else None, part, j, plan.nn - 1, write)


# --------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------

def _streams(a, op: QOperand, plan: _Plan):
    """a [rows, K] -> [rows, streams * hx]: x's column layout (K padded to Kp, split into
    the 4-bit streams, each zero-padded to nk * tx)."""
    a = jnp.pad(a, ((0, 0), (0, op.k_padded - a.shape[1])))
    parts = [a[:, :plan.kd], a[:, plan.kd:]] if plan.streams == 2 else [a]
    parts = [jnp.pad(p, ((0, 0), (0, plan.hx - p.shape[1]))) for p in parts]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _forward(x, op: QOperand, u, v, scale: float, lp: _LoraPlan, interpret):
    plan, rp = lp.base, lp.rp
    m, r = x.shape[0], u.shape[1]
    s, nk, n = plan.streams, plan.nk, op.n
    cdt = jnp.dtype(plan.compute_dtype)
    xp = _pad_activation(x, op, plan)
    up = _streams(jnp.pad(u.T, ((0, rp - r), (0, 0))), op, plan).T.astype(cdt)
    vp = jnp.pad(v.astype(_F32), ((0, rp - r), (0, plan.nn * plan.bn - n)))
    mt = plan.mp // plan.bm
    if plan.kernel == "decode":
        grid = (plan.nn, nk)
        x_specs = [pl.BlockSpec((plan.mp, plan.tx), lambda j, k, o=st * nk: (0, k + o))
                   for st in range(s)]
        u_specs = [pl.BlockSpec((plan.tx, rp), lambda j, k, o=st * nk: (k + o, 0))
                   for st in range(s)]
        v_spec = pl.BlockSpec((rp, plan.bn), lambda j, k: (0, j))
        index = lambda f: (lambda j, k: (f(k), j))
        out_spec = pl.BlockSpec((plan.mp, plan.bn), lambda j, k: (0, j))
        xu_shape = (plan.nn, plan.mp, rp)
        xu_spec = pl.BlockSpec((None, plan.mp, rp), lambda j, k: (j, 0, 0))
    else:
        grid = (mt, plan.nn, nk)
        x_specs = [pl.BlockSpec((plan.bm, plan.tx), lambda i, j, k, o=st * nk: (i, k + o))
                   for st in range(s)]
        u_specs = [pl.BlockSpec((plan.tx, rp), lambda i, j, k, o=st * nk: (k + o, 0))
                   for st in range(s)]
        v_spec = pl.BlockSpec((rp, plan.bn), lambda i, j, k: (0, j))
        index = lambda f: (lambda i, j, k: (f(k), j))
        out_spec = pl.BlockSpec((plan.bm, plan.bn), lambda i, j, k: (i, j))
        if lp.shared:
            xu_shape = (plan.mp, rp)
            xu_spec = pl.BlockSpec((plan.bm, rp), lambda i, j, k: (i, 0))
        else:
            xu_shape = (plan.nn, plan.mp, rp)
            xu_spec = pl.BlockSpec((None, plan.bm, rp), lambda i, j, k: (j, i, 0))
    w_arrays, w_specs = _weight_inputs(op, plan, index)
    scratch = [pltpu.VMEM((plan.tx, plan.bn), cdt) for _ in range(s)]
    if nk > 1:
        scratch.append(pltpu.VMEM((plan.bm, plan.bn), _F32))
    kern = functools.partial(_fwd_kernel, lp=lp, fmt=op.fmt, has_zeros=op.zeros is not None,
                             scale=scale)
    col_tiles = 1 if lp.shared else plan.nn
    flops = 2 * plan.mp * s * plan.hx * (n + rp * col_tiles) + 2 * plan.mp * rp * n
    bytes_accessed = ((xp.size * xp.dtype.itemsize + up.size * up.dtype.itemsize) * plan.nn
                      + op.data.size * op.data.dtype.itemsize * mt
                      + vp.size * 4 * mt + plan.mp * n * x.dtype.itemsize)
    y, xu = pl.pallas_call(
        kern,
        out_shape=[jax.ShapeDtypeStruct((plan.mp, n), x.dtype),
                   jax.ShapeDtypeStruct(xu_shape, _F32)],
        grid=grid,
        in_specs=x_specs + w_specs + u_specs + [v_spec],
        out_specs=[out_spec, xu_spec],
        scratch_shapes=scratch,
        compiler_params=compiler_params(plan.vmem_bytes, lp.semantics),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=bytes_accessed),
        interpret=interpret,
        name=f"lora_qmatmul_{plan.kernel}_{op.fmt.name}",
    )(*([xp] * s), *w_arrays, *([up] * s), vp)
    if xu.ndim == 3:
        xu = xu[0]
    return y[:m], xu[:m, :r]


def _transposed(x, op: QOperand, u, v, scale: float, lp: _LoraPlan, interpret):
    plan, rp = lp.base, lp.rp
    m, r = x.shape[0], u.shape[1]
    s, nk, nn, n = plan.streams, plan.nk, plan.nn, op.n
    cdt = jnp.dtype(plan.compute_dtype)
    xp = jnp.pad(x, ((0, plan.mp - m), (0, nn * plan.bn - n)))
    up = jnp.pad(u, ((0, nn * plan.bn - n), (0, rp - r))).astype(cdt)
    vp = _streams(jnp.pad(v.astype(_F32), ((0, rp - r), (0, 0))), op, plan)
    mt = plan.mp // plan.bm
    grid = (mt, nk, nn)
    index = lambda f: (lambda i, k, j: (f(k), j))
    w_arrays, w_specs = _weight_inputs(op, plan, index)
    v_specs = [pl.BlockSpec((rp, plan.tx), lambda i, k, j, o=st * nk: (0, k + o))
               for st in range(s)]
    if lp.shared:
        xu_shape = (plan.mp, rp)
        xu_spec = pl.BlockSpec((plan.bm, rp), lambda i, k, j: (i, 0))
    else:
        xu_shape = (nk, plan.mp, rp)
        xu_spec = pl.BlockSpec((None, plan.bm, rp), lambda i, k, j: (k, i, 0))
    scratch = [pltpu.VMEM((plan.tx, plan.bn), cdt) for _ in range(s)]
    if nn > 1:
        scratch += [pltpu.VMEM((plan.bm, plan.tx), _F32) for _ in range(s)]
    kern = functools.partial(_t_kernel, lp=lp, fmt=op.fmt, has_zeros=op.zeros is not None,
                             n=n, scale=scale)
    row_tiles = 1 if lp.shared else nk
    flops = (2 * plan.mp * s * plan.hx * nn * plan.bn + 2 * plan.mp * nn * plan.bn * rp
             * row_tiles + 2 * plan.mp * rp * s * plan.hx)
    bytes_accessed = ((xp.size * xp.dtype.itemsize + up.size * up.dtype.itemsize) * nk
                      + op.data.size * op.data.dtype.itemsize * mt
                      + vp.size * 4 * mt + s * plan.mp * plan.hx * x.dtype.itemsize)
    outs = pl.pallas_call(
        kern,
        out_shape=[jax.ShapeDtypeStruct((plan.mp, plan.hx), x.dtype) for _ in range(s)]
        + [jax.ShapeDtypeStruct(xu_shape, _F32)],
        grid=grid,
        in_specs=[pl.BlockSpec((plan.bm, plan.bn), lambda i, k, j: (i, j))] + w_specs
        + [pl.BlockSpec((plan.bn, rp), lambda i, k, j: (j, 0))] + v_specs,
        out_specs=[pl.BlockSpec((plan.bm, plan.tx), lambda i, k, j: (i, k))
                   for _ in range(s)] + [xu_spec],
        scratch_shapes=scratch,
        compiler_params=compiler_params(plan.vmem_bytes, lp.semantics),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=bytes_accessed),
        interpret=interpret,
        name=f"lora_qmatmul_t_{op.fmt.name}",
    )(xp, *w_arrays, up, *([vp] * s))
    *ys, xu = outs
    y = ys[0][:m, :plan.kd] if s == 1 else jnp.concatenate([o[:m, :plan.kd] for o in ys],
                                                             axis=1)
    if xu.ndim == 3:
        xu = xu[0]
    return y[:, :op.k], xu[:m, :r]


def lora_qmatmul_mosaic(x2: jax.Array, op: QOperand, u: jax.Array, v: jax.Array,
                        scale: float, config: MatmulConfig | None = None, *,
                        transposed: bool = False, interpret=False):
    """(y, xu) with y = x2 @ W + scale * (x2 @ u) @ v (W.T when transposed), xu = x2 @ u.

    x2: [M, din] float32 / bfloat16 / float16 (din = K, or N when transposed; float16 runs
    as float32); op: the QOperand of the stored W [K, N]; u [din, r], v [r, dout] float;
    scale: a Python float. y is in x2's dtype (float32 accumulation), xu float32 [M, r].
    `config` as for `qmatmul_mosaic` (None: the heuristic table's, moved to legal tiles);
    interpret: False on a TPU, True or `pltpu.InterpretParams(...)` anywhere.

    Raises ValueError for shape mismatches between x2, W, u and v, unsupported dtypes, and
    configs that break Mosaic's tiling rules.
    """
    _check_operand(op)
    din, dout = (op.n, op.k) if transposed else (op.k, op.n)
    check_activation(x2, "x", din, "N" if transposed else "K")
    r = check_factors(u, v, din, dout, "lora_qmatmul_mosaic")
    lp = plan_lora_mosaic(op, x2.shape[0], x2.dtype, r, config, transposed=transposed)
    out_dtype = x2.dtype
    x = _kernel_activation(x2)
    run = _transposed if transposed else _forward
    y, xu = run(x, op, u, v, float(scale), lp, interpret)
    return y.astype(out_dtype), xu


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------

forward = lora_qmatmul_mosaic
unsupported = qmatmul_mosaic.unsupported
SPACE = qmatmul_mosaic.SPACE
MAX_CONFIGS = qmatmul_mosaic.MAX_CONFIGS


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """qmatmul's Mosaic space, planned by `plan_lora_mosaic` (whose VMEM budget counts the
    factors and xu too) for the problem's rank."""
    is_t = problem.kernel == "lora_t"
    configs = _space.grid({k: space[k] for k in ("block_m", "block_n", "block_k")},
                          **({"block_m": 16} if problem.m <= DECODE_M else {}))
    kept, pruned = _space.search(
        configs, lambda c: plan_lora_mosaic(op, problem.m, problem.x_dtype,
                                            max(problem.rank, 1), c, transposed=is_t),
        lambda p: (p.base.bm, p.base.bn, p.base.td, p.base.nk))
    return kept, pruned, default_config("mosaic_tpu", problem.m)
