"""W8A8 matmul: int8 activations (per row, on the fly) times an int8 weight.

    y = w8a8_matmul(x, op)        # x [..., K] float, op an int8 QOperand of W [K, N]

Backends: the `xla` path (_xla_w8a8.py) runs on every device and is used for all of them
until Pallas W8A8 kernels land. The gradient with respect to x is straight-through on the
activation quantisation: dy @ W.T with the weight-only transposed kernel.
"""

from __future__ import annotations

import functools

import jax

from . import _backend
from ._operand import QOperand
from ._xla_w8a8 import check_w8a8_operand, w8a8_xla
from .qmatmul import _run, _zero_cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _w8a8_2d(x2, op, sel):
    return w8a8_xla(x2, op)


def _fwd(x2, op, sel):
    return w8a8_xla(x2, op), op


def _bwd(sel, op, dy):
    return _run(dy, op, sel, None, transposed=True), jax.tree_util.tree_map(_zero_cotangent, op)


_w8a8_2d.defvjp(_fwd, _bwd)


def w8a8_matmul(x: jax.Array, op: QOperand, *, backend: str | None = None) -> jax.Array:
    """x[..., K] @ W[K, N] with x quantised to int8 per row; returns x's dtype."""
    check_w8a8_operand(op)
    sel = _backend.resolve(backend)
    lead, k = x.shape[:-1], x.shape[-1]
    if k != op.k:
        raise ValueError(f"w8a8_matmul: x has {k} columns but the weight's K is {op.k}.")
    y = _w8a8_2d(x.reshape(-1, k), op, sel)
    return y.reshape(*lead, op.n)
