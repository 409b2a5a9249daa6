"""QArray's convolution routing: `lax.conv_general_dilated` with a QArray kernel goes to the
quantised convolution (`qkern.pallas.qconv`), in whichever layout the dimension numbers
give. A pending transpose of the QArray (`perm`) is folded into the dimension numbers, so
the kernel stays in its stored layout. A QArray as the convolution's input (lhs) is
dequantised by the core's default, like every operation without a rule.

Mixed precision as for matmuls: the result has the dtype the dense convolution gives
(preferred_element_type honoured), computed in the widest of x's, the kernel's and that
dtype. `act_fmt="int8"` runs W8A8 with per-pixel (or calibrated) activation scales; under
`qkern.calibrate` the kernel records its input's absmax and runs weight-only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._core import ArrayLike, Value, register
from ..formats._quantize import dequantize_scales
from ..pallas.qconv import ConvOperand, qconv
from ._qarray_matmul import dense_dtypes, static_act_scale, without_double_quant
from .qarray import QArray

lax = jax.lax


def conv_operand(w: QArray, params: dict) -> tuple[ConvOperand, dict]:
    """(the kernel operand in its stored layout, params whose dimension numbers name
    stored axes)."""
    w = without_double_quant(w.fitted())
    dn = params["dimension_numbers"]
    if w.perm is not None:       # logical axis i is stored axis perm[i]
        rhs = tuple(w.perm[a] for a in dn.rhs_spec)
        params = dict(params, dimension_numbers=dn._replace(rhs_spec=rhs))
    scales = dequantize_scales(w.scales, None, None, w.format)
    return ConvOperand(w.data, scales, w.zeros, w.format, w.layout), params


def _check_axes(w: QArray, params) -> None:
    """The kernel's blocks against the convolution, in the axes the user's code names
    (qkern.pallas.qconv checks again in stored axes)."""
    dn = params["dimension_numbers"]
    axis, out_axis, in_axis = w.block_axis, dn.rhs_spec[0], dn.rhs_spec[1]
    shape = w.logical_shape
    if axis is not None and axis == out_axis:
        contracted = ", ".join(str(a) for a in sorted(dn.rhs_spec[1:]))
        raise ValueError(
            f"qkern: a convolution kernel of shape {shape} is quantised in blocks along axis "
            f"{axis}, its output-feature axis, which a convolution does not contract (it "
            f"contracts axes {contracted}). Quantise it along its input-feature axis "
            f"instead: qkern.quantize(w, fmt, axis={in_axis}) (or Rule(axis={in_axis})).")
    # Blocked along another axis, the scales still vary along the input features (one per
    # input feature), which W8A8's per-(tap, feature block) int8 parts cannot apply.
    if (w.act_fmt is not None and axis is not None and axis != in_axis
            and (w.layout.num_blocks > 1 or shape[in_axis] > 1)):
        raise ValueError(
            f"W8A8 convolution needs the kernel's blocks along its input-feature axis (axis "
            f"{in_axis}), per tensor, or (one input feature, depthwise) one block along "
            f"another axis; the kernel of shape {shape} has {w.layout.num_blocks} block(s) "
            f"along axis {axis}. Quantise it with axis={in_axis}.")


def qconv_dispatch(x, w: QArray, params: dict):
    """`lax.conv_general_dilated_p.bind(x, w, **params)` with the QArray kernel `w`."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return Value.default(lax.conv_general_dilated_p, [x, w], params)
    out, compute = dense_dtypes(lax.conv_general_dilated_p, (x, w), params, x, w.dtype,
                                w.compute_dtype)
    _check_axes(w.fitted(), params)
    op, stored = conv_operand(w, params)
    if w.act_fmt is None:
        return qconv(x, op, stored, compute=compute).astype(out)
    record = getattr(w, "record_activation", None)
    if record is not None:
        record(x)
        return qconv(x, op, stored, compute=compute).astype(out)
    return qconv(x, op, stored, compute=compute, w8a8=True,
                 act_scale=static_act_scale(w)).astype(out)


@register(lax.conv_general_dilated_p)
def _(x: ArrayLike, w: QArray, **params):
    return qconv_dispatch(x, w, params)
