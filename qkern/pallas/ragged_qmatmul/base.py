"""What every ragged (grouped) quantised matmul backend computes, and the checks made first.

The operand is a stack of E quantised experts, `StackedOperand`: the 2-D `QOperand`
layout with a leading experts axis (data [E, Kd, N], scales [E, nb, N], zeros
[E, nb, N] or None), so that `op.expert(e)` is expert e's `QOperand` (a dynamic index,
no copy of the other experts). The activation x[M, K] holds its rows grouped
contiguously: rows `starts[e] .. ends[e] - 1` belong to expert e, where `ends` is the
cumulative sum of `group_sizes` [E]. As in `jax.lax.ragged_dot`, rows past
`sum(group_sizes)` are zero in the result, and a group that runs past row M is cut at M.

    y[i] = x[i] @ dequantise(W_e)      for the e with starts[e] <= i < ends[e]
    (transposed: y[i] = x[i] @ dequantise(W_e).T, the gradient with respect to x)

`reference` computes exactly that by dequantising every expert (tests, small problems).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ...formats import Format
from .._operand import QOperand, reference_dequantize
from ..qmatmul.base import DTYPES, check_operand as check_2d_operand


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedOperand:
    """E quantised experts of logical shape [K, N] each, blocks along K, in the stored
    layout of `QOperand` with a leading experts axis. `qkern.QArray`s of shape [E, K, N]
    quantised along K (`qkern.quantize(w, fmt, axis=-2)`) become one under `quaxify`."""

    data: jax.Array
    scales: jax.Array
    zeros: Any
    fmt: Format = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))

    @property
    def experts(self) -> int:
        return self.data.shape[0]

    @property
    def n(self) -> int:
        return self.data.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.scales.shape[1]

    def expert(self, e) -> QOperand:
        """Expert `e`'s 2-D operand (e an int or a traced scalar)."""
        pick = lambda a: None if a is None else jax.lax.dynamic_index_in_dim(a, e, 0, False)
        return QOperand(pick(self.data), pick(self.scales), pick(self.zeros), self.fmt,
                        self.block_size, self.k)


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(starts, ends) [E] int32 of each group's rows, cut at row m (as lax.ragged_dot)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    return jnp.clip(starts, 0, m), jnp.clip(ends, 0, m)


def reference(x: jax.Array, op: StackedOperand, group_sizes: jax.Array, *,
              transposed: bool = False) -> jax.Array:
    """The grouped product in float32 from every expert dequantised, in x's dtype."""
    w = jnp.stack([reference_dequantize(op.expert(e)) for e in range(op.experts)])  # [E, K, N]
    if transposed:
        w = jnp.swapaxes(w, 1, 2)
    m = x.shape[0]
    starts, ends = group_bounds(group_sizes, m)
    rows = jnp.arange(m)[:, None]
    member = (rows >= starts[None, :]) & (rows < ends[None, :])          # [M, E]
    per_expert = jnp.einsum("mk,ekn->emn", x.astype(jnp.float32), w,
                            precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("me,emn->mn", member.astype(jnp.float32), per_expert,
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def check_operand(op: StackedOperand) -> None:
    """A StackedOperand whose arrays agree with each other and with its format."""
    if not isinstance(op, StackedOperand):
        raise TypeError("ragged_qmatmul expects a StackedOperand (qkern.pallas.ragged_qmatmul"
                        f".StackedOperand) of experts [E, K, N]; got {type(op).__name__}.")
    if op.data.ndim != 3 or op.scales.ndim != 3:
        raise ValueError(f"StackedOperand data and scales must be 3-D [E, ...]; got data "
                         f"{op.data.shape}, scales {op.scales.shape}.")
    e = op.data.shape[0]
    for name in ("scales", "zeros"):
        a = getattr(op, name)
        if a is not None and a.shape[0] != e:
            raise ValueError(f"StackedOperand {name} {a.shape} do not have the {e} experts of "
                             f"data {op.data.shape}.")
    check_2d_operand(jax.eval_shape(lambda o: o.expert(0), op))


def check_group_sizes(group_sizes, experts: int, m: int) -> jax.Array:
    """group_sizes as an int32 [E] array; concrete values are also checked (non-negative,
    summing to at most M). Traced values follow lax.ragged_dot: rows past the sum are
    zero and a sum past M is cut at M."""
    if isinstance(group_sizes, (list, tuple)):
        group_sizes = np.asarray(group_sizes)
    shape = np.shape(group_sizes)
    dtype = jnp.result_type(group_sizes)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"ragged_qmatmul: group_sizes must be integers; got dtype {dtype} "
                        f"(shape {shape}).")
    if shape != (experts,):
        raise ValueError(f"ragged_qmatmul: group_sizes has shape {shape} but the stacked "
                         f"weight has {experts} experts; pass one size per expert, shape "
                         f"({experts},).")
    if not isinstance(group_sizes, jax.core.Tracer):
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any():
            raise ValueError(f"ragged_qmatmul: group_sizes {sizes.tolist()} has negative "
                             "sizes; each group is a count of rows.")
        if int(sizes.sum()) > m:
            raise ValueError(f"ragged_qmatmul: group_sizes {sizes.tolist()} sum to "
                             f"{int(sizes.sum())}, more rows than x has (M={m}).")
    return jnp.asarray(group_sizes, jnp.int32)


def check_activation(a, name: str, want: int, what: str) -> None:
    """A 2-D float activation [M, want] (name: "x" or "dy"; what: "K" or "N")."""
    if not hasattr(a, "ndim") or a.ndim != 2:
        raise ValueError(f"ragged_qmatmul: {name} must be 2-D [M, {what}] with its rows "
                         f"grouped by expert; got shape {getattr(a, 'shape', None)}.")
    if jnp.dtype(a.dtype) not in DTYPES:
        raise ValueError(f"ragged_qmatmul: {name} dtype {a.dtype} is not supported; use "
                         "float32, bfloat16 or float16.")
    if a.shape[1] != want:
        raise ValueError(f"ragged_qmatmul: {name} has {what}={a.shape[1]} (shape {a.shape}) "
                         f"but each quantised expert has {what}={want}.")
