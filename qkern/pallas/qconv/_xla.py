"""The xla backend of the quantised convolution, for every device.

Weight-only (`forward`): XLA's own convolution, with the kernel dequantised to the compute
dtype one piece at a time. A kernel whose dequantised form fits `CHUNK_BYTES` is one piece
(on CPU, dequantising it costs a pass over the codes next to a convolution that reads it
once per output pixel); a larger one is split along its output features into pieces of about
`CHUNK_BYTES` each (whole feature groups), each piece dequantised and convolved in turn, so
the whole dequantised kernel never exists at once. Measured on a 2-core AMD EPYC (see
docs/benchmarks.md): at 36 MB (3x3x1024x1024 float32) two to four pieces are as fast as the
dense convolution, one piece 0-40 % slower.

W8A8 (`forward_w8a8`): x is quantised to int8 per input pixel (or with the one static scale),
and the convolution is split into the parts of the contraction where the kernel's scale is
one number per output feature: one kernel tap (one position of its spatial window) and one
block of input features. Each part is an int8 convolution with a one-tap kernel
(`preferred_element_type=int32`): the tap's offset moves into the padding (negative padding
crops), so strides, padding and both dilations carry over unchanged. Its int32 sums are
scaled by the part's weight scales and by the activation scale of the pixel each output
read (the pixel scales moved the same way), and the parts are added in float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp

from .base import ConvOperand, _bind, pixel_scales

lax = jax.lax
CHUNK_BYTES = 8 << 20


def _slice(a, axis, start, stop):
    return lax.slice_in_dim(a, start, stop, axis=axis)


def _piece(op: ConvOperand, axis: int, start: int, stop: int) -> ConvOperand:
    """The kernel's features [start, stop) along a non-block axis, still quantised."""
    lay = op.layout
    cut = lambda a: a if a is None or a.shape[axis] == 1 and lay.shape[axis] != 1 \
        else _slice(a, axis, start, stop)
    shape = lay.shape[:axis] + (stop - start,) + lay.shape[axis + 1:]
    return ConvOperand(cut(op.data), cut(op.scales), cut(op.zeros), op.fmt,
                       dataclasses.replace(lay, shape=shape))


def chunk_plan(op: ConvOperand, params, itemsize: int) -> list[tuple[int, int]]:
    """[(first, last) output feature], whole feature groups, about CHUNK_BYTES dequantised
    each; one piece when the kernel fits or batch groups are used."""
    dn = params["dimension_numbers"]
    out = op.shape[dn.rhs_spec[0]]
    groups = params["feature_group_count"]
    total = math.prod(op.shape) * itemsize
    if total <= CHUNK_BYTES or params["batch_group_count"] != 1 or out <= 1:
        return [(0, out)]
    unit = out // groups if groups > 1 else 1
    units = out // unit
    per = -(-units // -(-total // CHUNK_BYTES))
    if unit == 1:
        per = min(units, -(-per // 8) * 8)
    return [(u * unit, min(units, u + per) * unit) for u in range(0, units, per)]


def forward(x, op: ConvOperand, params, compute) -> jax.Array:
    dn = params["dimension_numbers"]
    o_axis, feat_in, feat_out = dn.rhs_spec[0], dn.lhs_spec[1], dn.out_spec[1]
    groups = params["feature_group_count"]
    x = x.astype(compute)
    plan = chunk_plan(op, params, jnp.dtype(compute).itemsize)
    if len(plan) == 1:
        return _bind(x, op.dequantize(compute), params, preferred_element_type=None)
    out_per_group = op.shape[o_axis] // groups
    in_per_group = x.shape[feat_in] // groups
    ys = []
    for start, stop in plan:
        w = _piece(op, o_axis, start, stop).dequantize(compute)
        if groups > 1:
            g0, g1 = start // out_per_group, stop // out_per_group
            xs = _slice(x, feat_in, g0 * in_per_group, g1 * in_per_group)
            ys.append(_bind(xs, w, params, feature_group_count=g1 - g0,
                            preferred_element_type=None))
        else:
            ys.append(_bind(x, w, params, preferred_element_type=None))
    return jnp.concatenate(ys, axis=feat_out)


def _feature_block(x, feat: int, groups: int, start: int, stop: int):
    """x's input features [start, stop) of every feature group."""
    if groups == 1:
        return _slice(x, feat, start, stop)
    per = x.shape[feat] // groups
    shape = x.shape[:feat] + (groups, per) + x.shape[feat + 1:]
    xs = _slice(x.reshape(shape), feat + 1, start, stop)
    return xs.reshape(x.shape[:feat] + (groups * (stop - start),) + x.shape[feat + 1:])


def forward_w8a8(x, op: ConvOperand, params, act_scale) -> jax.Array:
    """int8 x int8 convolutions, one per (kernel tap, input-feature block); float32 out."""
    dn = params["dimension_numbers"]
    lay = op.layout
    o_axis, i_axis, spatial = dn.rhs_spec[0], dn.rhs_spec[1], dn.rhs_spec[2:]
    feat_in, feat_out = dn.lhs_spec[1], dn.out_spec[1]
    groups = params["feature_group_count"]
    xq, sx = pixel_scales(x, params, act_scale)
    n_in = lay.shape[i_axis]
    if lay.per_tensor or lay.axis != i_axis:
        blocks = [(0, n_in)]
    else:
        b = lay.block_size
        blocks = [(s, min(s + b, n_in)) for s in range(0, n_in, b)]
    codes = op.data
    if lay.axis == i_axis and codes.shape[i_axis] != n_in:          # drop the block padding
        codes = _slice(codes, i_axis, 0, n_in)
    dynamic = act_scale is None
    ones = None
    if dynamic:   # a one-tap kernel of ones moves the pixel scales as the parts move x
        ones = jnp.ones((1,) * len(lay.shape), jnp.float32)
    y = None
    ranges = [range(lay.shape[a]) for a in spatial]
    for taps in itertools.product(*ranges):
        padding = []
        for d, (a, t) in enumerate(zip(spatial, taps)):
            lo, hi = params["padding"][d]
            dil = params["rhs_dilation"][d]
            padding.append((lo - t * dil, hi - (lay.shape[a] - 1 - t) * dil))
        padding = tuple(padding)
        moved = None
        if dynamic:
            moved = _bind(sx, ones, params, padding=padding, feature_group_count=1,
                          batch_group_count=1, preferred_element_type=None, precision=None)
        for bi, (c0, c1) in enumerate(blocks):
            w = codes
            sc = op.scales
            for a, t in zip(spatial, taps):
                w = _slice(w, a, t, t + 1)
                if sc.shape[a] != 1:
                    sc = _slice(sc, a, t, t + 1)
            w = _slice(w, i_axis, c0, c1)
            if sc.shape[i_axis] != 1:
                sc = _slice(sc, i_axis, bi, bi + 1)
            xs = _feature_block(xq, feat_in, groups, c0, c1)
            part = _bind(xs, w, params, padding=padding, preferred_element_type=jnp.int32,
                         precision=None).astype(jnp.float32)
            # the part's weight scale, one per output feature, on the output's feature axis
            s_out = sc.reshape(sc.shape[o_axis])
            bshape = [1] * part.ndim
            bshape[feat_out] = s_out.shape[0]
            part = part * s_out.reshape(bshape)
            if dynamic:
                part = part * moved
            y = part if y is None else y + part
    if not dynamic:
        y = y * sx
    return y
