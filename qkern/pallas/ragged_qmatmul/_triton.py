"""Grouped (ragged) quantised matmul for NVIDIA GPUs: one Pallas kernel lowered through
Triton, built on the 2-D weight-only kernel's tile routine (`qmatmul/_triton.py`).

    y = ragged_triton(x, op, group_sizes)    # x [M, K], op a StackedOperand [E, K, N]

Schedule (as in grouped-matmul kernels such as Pallas's megablox): the rows of x are cut
into tiles of `bm` rows at multiples of `bm`; a work item is a (row tile, group) pair
whose rows meet. Groups are contiguous, so there are at most ceil(M / bm) + E - 1 items;
their table (each item's group and row tile, and how many items there are) is computed
from group_sizes by a few XLA ops before the launch. The grid is (items bound, N tiles):
program (i, j) decodes its group's expert tile by tile along K (the 2-D kernel's
`_accumulate_tile`: per-block scales, zero points, the two nibble halves of 4-bit codes)
and stores the rows of its tile that belong to its group, masked. Programs past the
item count do nothing. The output starts as zeros (aliased in), so rows in no group are
zero; two items that share a row tile write disjoint rows.

Experts are picked inside the kernel (`ref.at[e, rows, cols]`) from the whole stacked operand, so
nothing is copied or gathered per expert; x is read whole, its tile by a dynamic row
offset (Triton has no scalar prefetch to steer BlockSpecs by data).

The transposed product (the gradient, `dy @ W_e.T`) and W8A8 run the `xla` schedule
(`_xla.py`) with the 2-D Triton kernels in its windows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._config import MatmulConfig
from .._triton_common import compiler_params, next_pow2
from ..qmatmul._triton import _accumulate_tile, _pad_activation, _plan, _precision, _scale_row
from . import _xla
from .base import StackedOperand, check_activation, check_operand, group_bounds


def work_items(group_sizes: jax.Array, m: int, bm: int, experts: int):
    """(group [I], row tile [I], count [1]) int32 of the (row tile, group) items, in group
    order, for I = ceil(M / bm) + E - 1 slots; slots past `count` are padding."""
    tiles = pl.cdiv(m, bm)
    slots = tiles + experts - 1
    starts, ends = group_bounds(group_sizes, m)
    first = starts // bm
    last = jnp.maximum(ends - 1, 0) // bm
    n = jnp.where(ends > starts, last - first + 1, 0)               # tiles per group
    offsets = jnp.cumsum(n)                                          # items before e+1
    i = jnp.arange(slots, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(offsets, i, side="right"), experts - 1)
    tile = first[group] + i - (offsets[group] - n[group])
    count = offsets[-1:].astype(jnp.int32)
    return group.astype(jnp.int32), jnp.clip(tile, 0, tiles - 1).astype(jnp.int32), count


class _Expert:
    """Expert `e` of a stacked ref, indexed as the 2-D ref the tile routine expects:
    `.at[rows, cols]` is the stacked ref's `.at[e, rows, cols]`, one indexer (Triton's
    lowering takes no chain of them)."""

    def __init__(self, ref, e):
        self.ref, self.e, self.dtype = ref, e, ref.dtype

    @property
    def at(self):
        return self

    def __getitem__(self, idx):
        return self.ref.at[(self.e, *idx)]


def _kernel(group_ref, tile_ref, count_ref, start_ref, end_ref, x_ref, d_ref, s_ref, *rest,
            p, has_zeros: bool):
    if has_zeros:
        z_ref, _, o_ref = rest
    else:
        z_ref, (_, o_ref) = None, rest
    it, j = pl.program_id(0), pl.program_id(1)

    @pl.when(it < count_ref[0])
    def _():
        e, t = group_ref[it], tile_ref[it]
        d, s = _Expert(d_ref, e), _Expert(s_ref, e)
        z = None if z_ref is None else _Expert(z_ref, e)
        row_x = pl.multiple_of(t * p.bm, p.bm)
        col_abs = j * p.bn
        cols_ok = p.n % p.bn == 0
        rows_ok = p.steps * p.bk == p.kd
        x_half = p.steps * p.bk
        xdt = x_ref.dtype

        def body(step, acc):
            row0 = pl.multiple_of(step * p.bk, p.bk)
            parts = []

            def consume(w, q, half, blk):
                xo = row0 + q * p.sub + (x_half if half else 0)
                xt = x_ref[pl.ds(row_x, p.bm), pl.ds(pl.multiple_of(xo, p.sub), p.sub)]
                part = jnp.dot(xt, w.astype(xdt), precision=_precision(xdt),
                               preferred_element_type=jnp.float32)
                if not p.per_channel:
                    part = part * _scale_row(s, blk, 0, col_abs, p, cols_ok)
                parts.append(part)

            _accumulate_tile(p, d, z, row0, 0, col_abs, rows_ok, cols_ok, consume)
            for part in parts:
                acc = acc + part
            return acc

        acc = jax.lax.fori_loop(0, p.steps, body, jnp.zeros((p.bm, p.bn), jnp.float32))
        if p.per_channel:
            acc = acc * _scale_row(s, 0, 0, col_abs, p, cols_ok)
        rows = row_x + jnp.arange(p.bm, dtype=jnp.int32)
        cols = col_abs + jnp.arange(p.bn, dtype=jnp.int32)
        mine = (rows >= start_ref[e]) & (rows < end_ref[e])
        mask = mine[:, None] & (cols < p.n)[None, :]
        plgpu.store(o_ref.at[pl.ds(row_x, p.bm), :], acc.astype(o_ref.dtype), mask=mask)


def _ragged_plan(op: StackedOperand, m: int, config: MatmulConfig | None):
    expert = jax.eval_shape(lambda o: o.expert(0), op)
    p = _plan(expert, max(m, 17), config, transposed=False)     # the tiled kernel's plan
    bm = 16 if m <= 16 else p.bm
    total = pl.cdiv(p.kd, p.bk)
    return dataclasses.replace(p, m=m, bm=min(bm, max(16, next_pow2(m))), steps=total,
                               split=1)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def ragged_triton(x: jax.Array, op: StackedOperand, group_sizes: jax.Array,
                  config: MatmulConfig | None = None, *, interpret: bool = False) -> jax.Array:
    """y[M, N]: row i of x times its group's quantised expert; float32 accumulation,
    result in x's dtype. config: block_m (rows per tile; 16 at M <= 16), block_n, block_k,
    num_warps, num_stages as for `qmatmul_triton` (split_k is not used)."""
    check_operand(op)
    check_activation(x, "x", op.k, "K")
    m = x.shape[0]
    if m == 0:
        return jnp.zeros((0, op.n), x.dtype)
    p = _ragged_plan(op, m, config)
    tiles = pl.cdiv(m, p.bm)
    rows = tiles * p.bm
    width = 2 * p.steps * p.bk if p.packed else p.steps * p.bk
    xp = _pad_activation(x, rows, width, p, p.packed)
    group, tile, count = work_items(group_sizes, m, p.bm, op.experts)
    starts, ends = group_bounds(group_sizes, m)
    e = op.experts
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
    cols = lambda rows_: pl.BlockSpec((e, rows_, p.bn), lambda i, j: (0, 0, j))
    in_specs = [whole(group.shape), whole(tile.shape), whole((1,)), whole((e,)), whole((e,)),
                whole(xp.shape), cols(p.kd), cols(p.nb)]
    args = [group, tile, count, starts, ends, xp, op.data, op.scales]
    if op.zeros is not None:
        in_specs.append(cols(p.nb))
        args.append(op.zeros)
    out0 = jnp.zeros((rows, p.n), x.dtype)
    in_specs.append(pl.BlockSpec((rows, p.bn), lambda i, j: (0, j)))
    args.append(out0)
    out = pl.pallas_call(
        functools.partial(_kernel, p=p, has_zeros=op.zeros is not None),
        grid=(group.shape[0], pl.cdiv(p.n, p.bn)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((rows, p.bn), lambda i, j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((rows, p.n), x.dtype),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=compiler_params(p),
        interpret=interpret,
        name="ragged_qmatmul_triton",
    )(*args)
    return out[:m]


# The products this module has no grouped kernel for run the xla schedule, whose windows
# select their 2-D kernel as any matmul does (the `qkern.backend` block, QKERN_BACKEND,
# the device: Triton's on a GPU), so that a window the 2-D Triton kernel cannot take
# falls back to xla like any other matmul.
def forward(x, op, group_sizes, config=None, *, interpret=False, w8a8=False, act_scale=None):
    if w8a8:    # no int8-activation grouped kernel: the xla schedule over 2-D W8A8 kernels
        return _xla.forward(x, op, group_sizes, None, interpret=interpret,
                            inner=(None, interpret), w8a8=True, act_scale=act_scale)
    return ragged_triton(x, op, group_sizes, config, interpret=interpret)


def transposed(dy, op, group_sizes, config=None, *, interpret=False):
    return _xla.transposed(dy, op, group_sizes, None, interpret=interpret,
                           inner=(None, interpret))


def unsupported(op) -> str | None:
    b = op.block_size
    if op.num_blocks > 1 and b < 16:
        return (f"block_size {b}: the Triton kernels need scale blocks of at least 16 rows "
                "(one dot per block)")
    return None


SPACE = dict(block_m=(16, 32, 64, 128), block_n=(32, 64, 128, 256),
             block_k=(32, 64, 128, 256, 512), num_warps=(4, 8), num_stages=(2, 3, 4))
MAX_CONFIGS = 48


def candidates(problem, op, space: dict, device_kind: str = ""):
    anchor = MatmulConfig(block_m=16, block_n=64, block_k=256)
    return [anchor], [], anchor
