"""Grouped (ragged) quantised matmul for TPUs: one Pallas kernel lowered through Mosaic,
built on the 2-D Mosaic kernel's plan and dequantisation (`qmatmul/_mosaic.py`).

    y = ragged_mosaic(x, op, group_sizes)    # x [M, K], op a StackedOperand [E, K, N]

Schedule (as in grouped-matmul kernels such as Pallas's megablox): the rows of x are cut
into tiles of `bm` rows at multiples of `bm`; a work item is a (row tile, group) pair
whose rows meet, at most ceil(M / bm) + E - 1 of them, in group order (so in row-tile
order). Their table (each item's group and row tile, and how many there are; the
`_triton.work_items` table) and the groups' row bounds are computed from group_sizes by a
few XLA ops and passed as scalar-prefetch arguments (`pltpu.PrefetchScalarGridSpec`), so
the BlockSpec index maps pick each step's x row tile and its expert's code, scale and zero
blocks: the pipeline fetches exactly one expert's tiles, nothing is gathered or copied.

Grid (N tiles "parallel", items "arbitrary", K steps "arbitrary"). The output block of
item i is (row tile of i, N tile), so consecutive items of one row tile revisit the same
block, which stays in VMEM: the first item of a row tile zeroes it, and each item, after
its last K step, writes the rows of the tile that belong to its group (groups are
disjoint, so rows are written, never summed). Each K step dequantises its expert's tile
as the 2-D kernel does (`_dequantise_tile`: per-block scales, zero points, the two nibble
streams of 4-bit codes, fp8 decoded from its bits, a masked K tail) and accumulates one
MXU dot per stream in a float32 scratch. Slots past the item count repeat the last item's
blocks (and its last K block, so nothing is fetched again) and compute nothing. Row tiles
that no item visits lie wholly past sum(group_sizes); the wrapper zeroes every row past
the sum.

Tiling: `plan_mosaic(expert, M, dtype, config, kernel="tiled")`, the 2-D tiled kernel's
plan for one expert (block_m a multiple of 8, 16 for bfloat16; block_n all of N or a
multiple of 128; block_k covering whole scale blocks, 8 scale rows per step; the VMEM
budget); the expert axis is a squeezed leading block dimension. Operands the 2-D Mosaic
kernels cannot run (`unsupported`) fall back to the xla backend.

The transposed product (the gradient, `dy @ W_e.T`) and W8A8 run the `xla` schedule
(`_xla.py`) with the 2-D Mosaic kernels in its windows.

Checked on a CPU-only machine: numerics in interpret mode (and the TPU interpreter's
race detector) and the Pallas-to-Mosaic lowering (`jax.export` for "tpu"); Mosaic's own
compiler runs only on a TPU and has not seen this kernel yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .._config import MatmulConfig, default_config
from .._mosaic_common import compiler_params
from ..qmatmul import _mosaic as _mosaic2d
from ..qmatmul._mosaic import (_dequantise_tile, _dot_precision, _kernel_activation,
                               _kernel_data, _pad_activation, _split_refs, plan_mosaic)
from . import _xla
from ._triton import work_items
from .base import StackedOperand, check_activation, check_operand, group_bounds

__all__ = ["ragged_mosaic", "item_table", "plan_ragged", "forward", "transposed",
           "unsupported"]


def item_table(group_sizes: jax.Array, m: int, bm: int, experts: int):
    """(group [I], row tile [I], count [1]) int32: `_triton.work_items`, with the slots
    past `count` repeating the last item, so that they revisit its blocks."""
    group, tile, count = work_items(group_sizes, m, bm, experts)
    i = jnp.arange(group.shape[0], dtype=jnp.int32)
    last = jnp.maximum(count[0] - 1, 0)
    pick = jnp.minimum(i, last)
    return group[pick], tile[pick], count


def _kernel(group_ref, tile_ref, count_ref, start_ref, end_ref, *refs, plan, fmt,
            has_zeros: bool):
    s = plan.streams
    ns = s if plan.scale_mode == "tiled" else 1
    x_refs, (w_ref,), s_refs, z_refs, (o_ref,), wq_refs, acc = _split_refs(
        refs, (s, 1, ns, ns if has_zeros else 0, 1, s, 1 if plan.nk > 1 else 0))
    i, k = pl.program_id(1), pl.program_id(2)
    last_k = plan.nk - 1
    valid = i < count_ref[0]
    t = tile_ref[i]
    first = (i == 0) | (t != tile_ref[jnp.maximum(i - 1, 0)])

    @pl.when(valid & first & (k == 0))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    def write(v):
        e = group_ref[i]
        rows = jax.lax.broadcasted_iota(jnp.int32, v.shape, 0) + t * plan.bm
        mine = (rows >= start_ref[e]) & (rows < end_ref[e])
        o_ref[...] = jnp.where(mine, v.astype(o_ref.dtype), o_ref[...])

    @pl.when(valid)
    def _():
        rows_valid = plan.kd - k * plan.td if plan.mask_k else None
        _dequantise_tile(plan, fmt, w_ref, s_refs, z_refs, wq_refs, rows_valid=rows_valid)
        cdt = wq_refs[0].dtype
        part = None
        for x_ref, wq in zip(x_refs, wq_refs):
            d = jnp.dot(x_ref[...].astype(cdt), wq[...], preferred_element_type=jnp.float32,
                        precision=_dot_precision(plan))
            part = d if part is None else part + d
        if plan.nk == 1:
            write(part)
        else:
            @pl.when(k == 0)
            def _():
                acc[0][...] = part

            @pl.when(k > 0)
            def _():
                acc[0][...] += part

            @pl.when(k == last_k)
            def _():
                write(acc[0][...])


def _index(plan, f):
    """The index map of a stacked weight block: (item's expert, f(K step), N tile); slots
    past the item count stay on the last K block (no refetch)."""
    def index(j, i, k, group_ref, tile_ref, count_ref, start_ref, end_ref):
        kk = jnp.where(i < count_ref[0], k, plan.nk - 1)
        return group_ref[i], f(kk), j
    return index


def _weight_inputs(op: StackedOperand, plan):
    """(arrays, specs) for the stacked data, scales and zeros: the 2-D kernel's blocks
    with the experts axis squeezed."""
    arrays = [_kernel_data(op)]
    specs = [pl.BlockSpec((None, plan.td, plan.bn), _index(plan, lambda k: k))]
    if plan.scale_mode == "tiled":
        fs = [lambda k: k, lambda k, o=plan.hi_block: k + o][:plan.streams]
    else:
        fs = [lambda k: 0]
    sspecs = [pl.BlockSpec((None, plan.scale_rows, plan.bn), _index(plan, f)) for f in fs]
    arrays += [op.scales] * len(sspecs)
    specs += sspecs
    if op.zeros is not None:
        arrays += [op.zeros] * len(sspecs)
        specs += [pl.BlockSpec((None, plan.scale_rows, plan.bn), _index(plan, f))
                  for f in fs]
    return arrays, specs


def plan_ragged(op: StackedOperand, m: int, dtype, config: MatmulConfig | None = None):
    """The 2-D tiled kernel's plan for one expert (`plan_mosaic`)."""
    expert = jax.eval_shape(lambda o: o.expert(0), op)
    return plan_mosaic(expert, m, dtype, config, kernel="tiled")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def ragged_mosaic(x: jax.Array, op: StackedOperand, group_sizes: jax.Array,
                  config: MatmulConfig | None = None, *, interpret=False) -> jax.Array:
    """y[M, N]: row i of x times its group's quantised expert; float32 accumulation,
    result in x's dtype. config: block_m (rows per tile), block_n, block_k as for
    `qmatmul_mosaic`'s tiled kernel (None: its heuristic, moved to legal tiles).
    interpret: False on a TPU; True or `pltpu.InterpretParams(...)` to run anywhere."""
    check_operand(op)
    check_activation(x, "x", op.k, "K")
    why = unsupported(op)
    if why is not None:
        raise ValueError(f"ragged_mosaic: {why}; use the xla backend.")
    m, out_dtype = x.shape[0], x.dtype
    if m == 0:
        return jnp.zeros((0, op.n), out_dtype)
    plan = plan_ragged(op, m, x.dtype, config)
    xk = _kernel_activation(x)
    expert = jax.eval_shape(lambda o: o.expert(0), op)
    xp = _pad_activation(xk, expert, plan)                 # [mp, streams * hx]
    group, tile, count = item_table(group_sizes, m, plan.bm, op.experts)
    starts, ends = group_bounds(group_sizes, m)
    s, nk = plan.streams, plan.nk

    def x_index(st):
        def index(j, i, k, group_ref, tile_ref, count_ref, start_ref, end_ref):
            kk = jnp.where(i < count_ref[0], k, nk - 1)
            return tile_ref[i], kk + st * nk
        return index

    x_specs = [pl.BlockSpec((plan.bm, plan.tx), x_index(st)) for st in range(s)]
    w_arrays, w_specs = _weight_inputs(op, plan)
    out_spec = pl.BlockSpec(
        (plan.bm, plan.bn), lambda j, i, k, g, t, c, st, en: (t[i], j))
    cdt = jnp.dtype(plan.compute_dtype)
    scratch = [pltpu.VMEM((plan.tx, plan.bn), cdt) for _ in range(s)]
    if nk > 1:
        scratch.append(pltpu.VMEM((plan.bm, plan.bn), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(plan.nn, group.shape[0], nk),
        in_specs=x_specs + w_specs,
        out_specs=out_spec,
        scratch_shapes=scratch)
    kern = functools.partial(_kernel, plan=plan, fmt=op.fmt, has_zeros=op.zeros is not None)
    y = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((plan.mp, op.n), xk.dtype),
        grid_spec=grid_spec,
        compiler_params=compiler_params(plan.vmem_bytes,
                                        ("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name=f"ragged_qmatmul_mosaic_{op.fmt.name}",
    )(group, tile, count, starts, ends, *([xp] * s), *w_arrays)
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]
    y = jnp.where(rows < ends[-1], y[:m], 0)               # rows past the sum (unvisited)
    return y.astype(out_dtype)


# The products this module has no grouped kernel for run the xla schedule, whose windows
# select their 2-D kernel as any matmul does (the `qkern.backend` block, QKERN_BACKEND,
# the device: Mosaic's on a TPU), so that a window the 2-D Mosaic kernel cannot take
# falls back to xla like any other matmul.
def forward(x, op, group_sizes, config=None, *, interpret=False, w8a8=False, act_scale=None):
    if w8a8:    # no int8-activation grouped kernel: the xla schedule over 2-D W8A8 kernels
        return _xla.forward(x, op, group_sizes, None, interpret=interpret,
                            inner=(None, interpret), w8a8=True, act_scale=act_scale)
    return ragged_mosaic(x, op, group_sizes, config, interpret=interpret)


def transposed(dy, op, group_sizes, config=None, *, interpret=False):
    return _xla.transposed(dy, op, group_sizes, None, interpret=interpret,
                           inner=(None, interpret))


def unsupported(op) -> str | None:
    """The 2-D Mosaic kernels' reasons (float32 scales; blocks a multiple of 8 rows)."""
    return _mosaic2d.unsupported(op)


SPACE = dict(block_m=(16, 32, 64, 128, 256), block_n=(128, 256, 512, 1024),
             block_k=(256, 512, 1024, 2048, 4096))
MAX_CONFIGS = 32


def candidates(problem, op, space: dict, device_kind: str = ""):
    anchor = default_config("mosaic_tpu", problem.m)
    return [anchor], [], anchor
