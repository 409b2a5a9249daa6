"""QArray's matmul routing: from a dot_general with a QArray operand to the kernels'
canonical form `x[M, K] @ W[K, N]` (a `QOperand`), or to the dense computation for every
other layout. Beside QArray, so that `qkern.pallas` never needs to know QArray."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._core import Value
from .._core._values import materialise_checked
from ..formats._quantize import dequantize_scales
from ..pallas import qmatmul, stored_operand, w8a8_matmul
from ..pallas.w8a8.base import quantize_activations
from .qarray import QArray


def without_double_quant(q: QArray) -> QArray:
    """Double-quantised scales are blocked in their flattened order; a slice of them would
    not line up with their second-level scales, so undo the second level first."""
    if q.dq_scale is None:
        return q
    scales = dequantize_scales(q.scales, q.dq_scale, q.dq_offset, q.format)
    return dataclasses.replace(q, scales=scales, dq_scale=None, dq_offset=None)


def qmatmul_dispatch(lhs, rhs, params):
    """dot_general with a QArray operand: layouts the kernels take (a 2-D QArray, one
    contracting dimension, no batch dimensions) go to `qmatmul`, in whichever direction
    the contraction needs; every other layout is computed correctly by dequantising first.
    A QArray with `act_fmt="int8"` (W8A8) goes to `w8a8_matmul` when the contraction runs
    along its blocks (x @ W); the other direction (x @ W.T) has no W8A8 kernel and runs
    weight-only."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    w_on_right = isinstance(rhs, QArray) and not isinstance(lhs, QArray)
    w_on_left = isinstance(lhs, QArray) and not isinstance(rhs, QArray)
    if len(lc) != 1 or not (w_on_right or w_on_left):
        return default_in_compute_dtype(jax.lax.dot_general_p, [lhs, rhs], params)
    w, x = (rhs, lhs) if w_on_right else (lhs, rhs)
    w = w.fitted()
    w_axis, x_axis = (rc[0], lc[0]) if w_on_right else (lc[0], rc[0])

    def dense():
        # A W8A8 weight contracted along its blocks (x @ W) rounds x as its kernel would,
        # also where no kernel takes the layout (a batched dot_general under vmap).
        xr = x
        physical = w_axis if w.perm is None else w.perm[w_axis]
        if (w.act_fmt is not None and physical == w.layout.axis
                and jnp.issubdtype(jnp.result_type(x), jnp.floating)):
            xr = _act_rounded(x, x_axis, w)
        operands = [xr, rhs] if w_on_right else [lhs, xr]
        return default_in_compute_dtype(jax.lax.dot_general_p, operands, params)

    if lb or rb:
        return dense()
    if w.ndim != 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return dense()
    op = stored_operand(w)
    if op is None and len(w.layout.shape) == 2 and w.layout.axis == 1:
        w = _rows_blocked(w)
        op = stored_operand(w)
    if op is None:
        return dense()
    physical = w_axis if w.perm is None else w.perm[w_axis]
    # Mixed precision as dense JAX: the result has the dtype the dense dot_general gives
    # (preferred_element_type honoured), computed in the widest of x's, W's and that dtype
    # (bf16 x against a float32 QArray computes in float32, like x @ dequantize(q); bf16 x
    # and W with float32 preferred compute in float32).
    out_dtype, compute = matmul_dtypes(lhs, rhs, params, x, w.dtype, w.compute_dtype)
    xm = jnp.moveaxis(x, x_axis, -1).astype(compute)
    if w.act_fmt is not None and physical == 0:
        y = _act_quantised(xm, w, op)
    else:
        y = qmatmul(xm, op, transposed=(physical == 1))      # [...x free..., W free]
    if w_on_left:                                              # dot_general: lhs free dims first
        y = jnp.moveaxis(y, -1, 0)
    return y.astype(out_dtype)


def default_in_compute_dtype(prim, operands, params, compute_dtype=None):
    """`Value.default` (every Value materialised, `prim` bound) for the layouts no kernel
    takes (a batched dot_general, several contracted axes, a 3-D kernel under `einsum`),
    still honouring a `compute_dtype`: that of `compute_dtype`, else of the QArray among
    `operands`. With one, the floating operands are cast to it and summed in float32, and
    the result has dense JAX's dtype, as the kernels' paths do."""
    if compute_dtype is None:
        compute_dtype = next((v.compute_dtype for v in operands if isinstance(v, QArray)
                              and v.compute_dtype is not None), None)
    dtype = lambda v: v.dtype if isinstance(v, Value) else jnp.result_type(v)
    floating = [jnp.issubdtype(dtype(v), jnp.floating) for v in operands]
    if compute_dtype is None or not floating[0] or not floating[1]:
        return Value.default(prim, operands, params)
    out, compute = dense_dtypes(prim, operands, params, operands[0], None, compute_dtype)
    arrays = [materialise_checked(v) if isinstance(v, Value) else v for v in operands]
    arrays = [a.astype(compute) if f else a for a, f in zip(arrays, floating)]
    return prim.bind(*arrays, **dict(params, preferred_element_type=jnp.dtype(jnp.float32))
                     ).astype(out)


def matmul_dtypes(lhs, rhs, params, x, w_dtype, compute_dtype=None):
    """(result dtype, compute dtype) of a dot_general with a Value operand, as dense JAX
    has them: see `dense_dtypes`."""
    return dense_dtypes(jax.lax.dot_general_p, (lhs, rhs), params, x, w_dtype, compute_dtype)


def dense_dtypes(prim, operands, params, x, w_dtype, compute_dtype=None):
    """(result dtype, compute dtype) of `prim` (dot_general, conv_general_dilated,
    ragged_dot_general) with a Value operand, as dense JAX has them: the result dtype of
    the dense `prim.bind(*operands, **params)` (Values by their avals;
    `preferred_element_type` honoured, JAX's own dtype errors raised), computed in the
    widest of x's, the weight's and that dtype; or in the weight's own `compute_dtype`
    where it has one (`qkern.quantize(..., compute_dtype=...)`: bitsandbytes' compute
    dtype; the result dtype stays dense JAX's)."""
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype if isinstance(a, Value)
                                          else jnp.result_type(a))
    out = jax.eval_shape(lambda *a: prim.bind(*a, **params), *map(spec, operands)).dtype
    if compute_dtype is not None:
        return out, jnp.dtype(compute_dtype)
    return out, jnp.promote_types(jnp.promote_types(jnp.result_type(x), w_dtype), out)


def _act_quantised(xm, w, op):
    """x @ W with activations quantised as `w.act_fmt` says: the W8A8 kernel, per-row
    scales on the fly or the static per-tensor `w.act_scale`. Under `qkern.calibrate` the
    weight records its activations' absmax instead and runs weight-only."""
    record = getattr(w, "record_activation", None)
    if record is not None:
        record(xm)
        return qmatmul(xm, op)
    return w8a8_matmul(xm, op, act_scale=static_act_scale(w))


def static_act_scale(w):
    """`w.act_scale` as the one scalar the kernels take (None: dynamic per-row scales). A
    stacked weight carries its one calibrated scale broadcast over the stacked axes."""
    scale = w.act_scale
    return scale if scale is None or jnp.ndim(scale) == 0 else jnp.reshape(scale, (-1,))[0]


def _act_rounded(x, axis, w):
    """x with the activation rounding of `w`'s W8A8 kernel applied along its contracted
    `axis` (per row, or the static `w.act_scale`), straight-through for the gradient: for
    the layouts that run dense (materialised W) instead of the W8A8 kernel."""
    record = getattr(w, "record_activation", None)
    if record is not None:                      # under qkern.calibrate: record, no rounding
        record(x)
        return x
    xm = jnp.moveaxis(x, axis, -1)
    codes, sx = quantize_activations(xm.reshape(-1, xm.shape[-1]), static_act_scale(w))
    xq = jnp.moveaxis((codes.astype(jnp.float32) * sx).reshape(xm.shape), -1, axis)
    return x + jax.lax.stop_gradient(xq.astype(x.dtype) - x)


def _rows_blocked(w):
    """A 2-D QArray blocked along its stored axis 1 (e.g. an Equinox `[out, in]` weight
    quantised along `in`) as the same QArray stored transposed, blocked along axis 0: the
    kernels' form. Costs one transpose of the codes and scales (not a dequantisation);
    4-bit codes stay packed (packing by halves along the block axis transposes with it)."""
    w = without_double_quant(w)
    lay = w.layout
    t = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)
    layout = dataclasses.replace(lay, shape=(lay.shape[1], lay.shape[0]), axis=0)
    perm = None if w.perm == (1, 0) else (1, 0)
    return dataclasses.replace(w, data=t(w.data), scales=t(w.scales), zeros=t(w.zeros),
                               layout=layout, perm=perm)
