"""Ragged (grouped) quantised matmul, the mixture-of-experts product: backend selection
and the gradient.

    y = ragged_qmatmul(x, op, group_sizes)   # x [M, K], op a StackedOperand of W [E, K, N]

Row i of x is multiplied by expert e's weight, where the rows of x are grouped
contiguously by expert and group e has `group_sizes[e]` rows: `jax.lax.ragged_dot(x, W,
group_sizes)` with W quantised. Rows past sum(group_sizes) are zero.

Backends, from the backend table (`pallas/_backend.py`), family "ragged_qmatmul": "xla"
(`_xla.py`, every device), "triton" (`_triton.py`) and "mosaic_tpu" (`_mosaic.py`): each
a grouped forward kernel, whose gradient and W8A8 run the xla schedule over that
backend's 2-D kernels. Derivatives, forward and reverse mode: the product is linear in x
(a `_linear` primitive), its transpose the same grouped product against each expert's
transpose (`dy @ W_e.T`, from the same storage); W8A8 is straight-through on the
activation rounding (a `jax.custom_jvp` whose tangent is the weight-only product). The
frozen quantised experts and the integer group sizes get no derivative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _backend
from .._config import MatmulConfig
from .._linear import LinearMap, linear
from ..w8a8.base import check_act_scale, check_w8a8_operand
from . import _mosaic, _triton, _xla
from .base import StackedOperand, check_activation, check_group_sizes, check_operand

FAMILY = "ragged_qmatmul"
_backend.register(FAMILY, xla=_xla, triton=_triton, mosaic_tpu=_mosaic)

__all__ = ["ragged_qmatmul", "StackedOperand"]


def _run(x, op, group_sizes, act_scale, sel, inner, config, transposed, w8a8=False):
    module, used = _backend.implementation(FAMILY, sel, op)
    if transposed:
        return module.transposed(x, op, group_sizes, config, interpret=used.interpret,
                                 **(dict(inner=inner) if module is _xla else {}))
    kw = dict(inner=inner) if module is _xla else {}
    if w8a8:
        kw.update(w8a8=True, act_scale=act_scale)
    return module.forward(x, op, group_sizes, config, interpret=used.interpret, **kw)


def _apply(x, *leaves, treedef, sel, inner, config, transposed):
    *op_leaves, group_sizes = leaves
    op = jax.tree_util.tree_unflatten(treedef, op_leaves)
    return _run(x, op, group_sizes, None, sel, inner, config, transposed)


@functools.lru_cache(maxsize=None)
def _linear_map(treedef, sel, inner, config, transposed: bool) -> LinearMap:
    """The weight-only grouped product as a linear map in x; its transpose is the grouped
    product against each expert's transpose. The window chosen for one direction suits the
    other too (same rows, same groups)."""
    kw = dict(treedef=treedef, sel=sel, inner=inner, config=config)
    return LinearMap(functools.partial(_apply, transposed=transposed, **kw),
                     functools.partial(_apply, transposed=not transposed, **kw),
                     "ragged_qmatmul")


def _ragged_linear(x, op, group_sizes, sel, inner, config, transposed):
    leaves, treedef = jax.tree_util.tree_flatten(op)
    return linear(x, (*leaves, group_sizes),
                  _linear_map(treedef, sel, inner, config, transposed))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _ragged_w8a8(x, op, group_sizes, act_scale, sel, inner, config):
    return _run(x, op, group_sizes, act_scale, sel, inner, config, False, True)


@_ragged_w8a8.defjvp
def _ragged_w8a8_jvp(sel, inner, config, primals, tangents):
    x, op, group_sizes, act_scale = primals
    # Straight-through on the activation rounding, as `w8a8_matmul`'s derivative: the
    # tangent is the weight-only grouped product of dx (reverse mode transposes it).
    y = _ragged_w8a8(x, op, group_sizes, act_scale, sel, inner, config)
    dy = _ragged_linear(tangents[0], op, group_sizes, sel, inner, config, False)
    return y, dy.astype(y.dtype)


def _ragged(x, op, group_sizes, act_scale, sel, inner, config, transposed, w8a8):
    if w8a8:
        return _ragged_w8a8(x, op, group_sizes, act_scale, sel, inner, config)
    return _ragged_linear(x, op, group_sizes, sel, inner, config, transposed)


def ragged_qmatmul(x: jax.Array, op: StackedOperand, group_sizes, *,
                   transposed: bool = False, w8a8: bool = False, act_scale=None,
                   backend: str | None = None,
                   config: MatmulConfig | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """x[M, K] times expert e's quantised W_e[K, N] for the rows of group e; [M, N].

    transposed=True: x[M, N] times W_e.T, [M, K] (the gradient's direction). group_sizes:
    [E] integers, traced or not; concrete ones must be non-negative and sum to at most M.
    Accumulates in float32; returns x's dtype. backend / interpret: as for `qmatmul`.
    w8a8=True (forward only; symmetric int8 experts): x is quantised to int8 as
    `w8a8_matmul` does it, per row (act_scale None) or by the static scalar `act_scale`.
    config: a MatmulConfig; the xla backend reads `block_m`, its window of rows (None:
    `_xla.default_tm`), the Triton kernel block_m/n/k, warps and stages (None: its
    heuristic).

        op = StackedOperand(...)                   # under quaxify, from a QArray [E, K, N]
        y = ragged_qmatmul(x, op, jnp.array([3, 0, 5, 2]))
    """
    check_operand(op)
    if w8a8:
        if transposed:
            raise ValueError("ragged_qmatmul: w8a8=True has no transposed kernel; the "
                             "gradient runs weight-only by itself.")
        check_w8a8_operand(jax.eval_shape(lambda o: o.expert(0), op))
        act_scale = check_act_scale(act_scale)
    elif act_scale is not None:
        raise ValueError("ragged_qmatmul: act_scale is for w8a8=True only.")
    want, what = (op.n, "N") if transposed else (op.k, "K")
    check_activation(x, "x", want, what)
    group_sizes = check_group_sizes(group_sizes, op.experts, x.shape[0])
    req = _backend.resolve(backend, interpret)
    _backend.implementation(FAMILY, req, op)           # an explicit backend that cannot run raises
    inner = (req.name if req.explicit else None, req.interpret if req.explicit else interpret)
    return _ragged(x, op, group_sizes, act_scale, req, inner, config, transposed, w8a8)
