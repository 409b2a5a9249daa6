"""What a quantised convolution computes, the operand it takes, and the checks every
backend makes first.

The operand (`ConvOperand`) is a quantised convolution kernel in its stored layout: codes,
float32 scales (double quantisation undone), optional zero points, the format and the
N-D `Layout` (stored shape, block axis, block size). The convolution's dimension numbers
name axes of that stored array; `qkern/types/_qarray_conv.py` maps a QArray's pending
transpose onto them, so no backend sees one.

Meaning (`reference`): `lax.conv_general_dilated` of x with the dequantised kernel, in the
compute dtype. W8A8 (`reference_w8a8`): x first quantised to int8 per input pixel (absmax
over its feature axis, or one static scale), then the same convolution of the dequantised
codes. The blocks must run along an axis the convolution contracts (the kernel's input
feature axis or a spatial axis): a block along the output-feature axis would give one
output several scales, which is refused by `check`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ...formats import Format, Layout, dequantize_array

lax = jax.lax
_INT8_MAX = 127.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConvOperand:
    data: jax.Array             # codes in the stored layout (padded/packed along the block axis)
    scales: jax.Array           # float32, layout.scale_shape
    zeros: Any                  # int8 zero points (minmax) or None
    fmt: Format = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        # the scales are float32 already (MX's E8M0 bytes decoded once, by conv_operand)
        return dequantize_array(self.fmt, self.data, self.scales, self.zeros, None, None,
                                self.layout, dtype, scales_decoded=True)


def _spec(params):
    return params["dimension_numbers"]


def check(x, op: ConvOperand, params) -> None:
    """Refuse, before any work, a kernel the quantised convolution cannot take."""
    if not isinstance(op, ConvOperand):
        raise TypeError(f"qconv needs a ConvOperand; got {type(op).__name__}.")
    dn = _spec(params)
    shape, lay = op.shape, op.layout
    if len(shape) != len(dn.rhs_spec):
        raise ValueError(f"qconv: the kernel has shape {shape} but the dimension numbers name "
                         f"{len(dn.rhs_spec)} kernel axes.")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"qconv: x must be floating point; got {jnp.result_type(x)}.")
    if not lay.per_tensor and lay.axis == dn.rhs_spec[0]:
        contracted = ", ".join(str(a) for a in sorted(dn.rhs_spec[1:]))
        raise ValueError(
            f"qkern: a convolution kernel of shape {shape} is quantised in blocks along axis "
            f"{lay.axis}, its output-feature axis, which a convolution does not contract "
            f"(it contracts axes {contracted}). Quantise it along its input-feature axis "
            f"instead: qkern.quantize(w, fmt, axis={dn.rhs_spec[1]}) (or Rule(axis=...)).")


def check_w8a8(op: ConvOperand, params) -> None:
    dn = _spec(params)
    lay = op.layout
    if op.fmt.name != "int8" or op.zeros is not None:
        raise ValueError(
            f"W8A8 convolution needs a symmetric int8 kernel; got {op.fmt.name}"
            f"{' with zero points' if op.zeros is not None else ''}.")
    if params["batch_group_count"] != 1:
        raise ValueError("W8A8 convolution does not take batch_group_count > 1 (got "
                         f"{params['batch_group_count']}); quantise the kernel without "
                         "act_fmt to run it weight-only.")
    if (not lay.per_tensor and lay.axis != dn.rhs_spec[1]
            and (lay.num_blocks > 1 or op.shape[dn.rhs_spec[1]] > 1)):
        raise ValueError(
            f"W8A8 convolution needs the kernel's blocks along its input-feature axis "
            f"(axis {dn.rhs_spec[1]}), per tensor, or (one input feature, depthwise) one "
            f"block along another axis; kernel of shape {op.shape} has {lay.num_blocks} "
            f"block(s) along axis {lay.axis}. Quantise it with axis={dn.rhs_spec[1]}.")


def pixel_scales(x, params, act_scale):
    """(int8 codes of x, float32 scales): per input pixel, absmax over x's feature axis /
    127 (scales have x's shape with a feature axis of 1), or the static `act_scale`
    (a scalar). A pixel of zeros gets scale 0 and codes 0."""
    feat = _spec(params).lhs_spec[1]
    x32 = x.astype(jnp.float32)
    if act_scale is None:
        s = jnp.max(jnp.abs(x32), axis=feat, keepdims=True) / _INT8_MAX
    else:
        s = jnp.asarray(act_scale, jnp.float32)
    q = jnp.round(x32 / jnp.where(s > 0, s, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), s


def _bind(x, w, params, **changes):
    p = dict(params, **changes)
    return lax.conv_general_dilated_p.bind(x, w, **p)


def reference(x, op: ConvOperand, params, compute=jnp.float32) -> jax.Array:
    """The plain meaning: the convolution with the whole kernel dequantised, in `compute`."""
    return _bind(x.astype(compute), op.dequantize(compute), params,
                 preferred_element_type=None)


def reference_w8a8(x, op: ConvOperand, params, act_scale=None) -> jax.Array:
    """W8A8's meaning: x quantised per pixel (or statically), dequantised, convolved in
    float32 with the dequantised kernel."""
    xq, s = pixel_scales(x, params, act_scale)
    return reference(xq.astype(jnp.float32) * s, op, params)
