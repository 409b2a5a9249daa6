"""Quantised matmul kernels and their selection.

`qmatmul_dispatch(lhs, rhs, params)` is what QArray's dot_general rule calls: layouts the
kernels take (a 2-D QArray, one contracting dimension, no batch dimensions) go to
`qmatmul`, in whichever direction the contraction needs; every other layout is computed
correctly by dequantising first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._core._dispatch import materialise_checked
from ._backend import backend
from ._config import MatmulConfig
from ._operand import QOperand
from .qmatmul import qmatmul

__all__ = ["qmatmul", "qmatmul_dispatch", "backend", "MatmulConfig", "QOperand", "stored_operand"]


def stored_operand(w) -> QOperand | None:
    """The kernel operand of a 2-D QArray's storage (ignoring a pending transpose), or None
    when its storage is not [K, N] with blocks along K."""
    from ..formats._quantize import dequantize_scales
    from ..formats import get_format

    lay = w.layout
    if len(lay.shape) != 2 or lay.axis != 0:
        return None
    fmt = get_format(w.fmt)
    scales = dequantize_scales(w.scales, None if fmt.kind == "mx" else w.dq_scale,
                               None if fmt.kind == "mx" else w.dq_offset, fmt)
    zeros = w.zeros
    n = lay.shape[1]
    if lay.per_tensor:
        scales = jnp.broadcast_to(scales, (1, n))
        zeros = None if zeros is None else jnp.broadcast_to(zeros, (1, n))
    return QOperand(w.data, scales, zeros, fmt, lay.block_size, lay.shape[0])


def _dense(lhs, rhs, params):
    from ..types.qarray import QArray
    lhs = materialise_checked(lhs) if isinstance(lhs, QArray) else lhs
    rhs = materialise_checked(rhs) if isinstance(rhs, QArray) else rhs
    return jax.lax.dot_general_p.bind(lhs, rhs, **params)


def qmatmul_dispatch(lhs, rhs, params):
    from ..types.qarray import QArray

    (lc, rc), (lb, rb) = params["dimension_numbers"]
    w_on_right = isinstance(rhs, QArray) and not isinstance(lhs, QArray)
    w_on_left = isinstance(lhs, QArray) and not isinstance(rhs, QArray)
    if lb or rb or len(lc) != 1 or not (w_on_right or w_on_left):
        return _dense(lhs, rhs, params)
    w, x = (rhs, lhs) if w_on_right else (lhs, rhs)
    w_axis, x_axis = (rc[0], lc[0]) if w_on_right else (lc[0], rc[0])
    if w.ndim != 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return _dense(lhs, rhs, params)
    op = stored_operand(w)
    if op is None:
        return _dense(lhs, rhs, params)
    physical = w_axis if w.perm is None else w.perm[w_axis]
    xm = jnp.moveaxis(x, x_axis, -1)
    y = qmatmul(xm, op, transposed=(physical == 1))          # [...x free..., W free]
    if w_on_left:                                              # dot_general: lhs free dims first
        y = jnp.moveaxis(y, -1, 0)
    out_dtype = params.get("preferred_element_type") or jnp.result_type(x)
    return y.astype(out_dtype)
