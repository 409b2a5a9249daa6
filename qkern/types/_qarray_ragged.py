"""QArray's grouped-matmul routing: `jax.lax.ragged_dot(x, W, group_sizes)` (and
`ragged_dot_general` in its ragged-rows mode, which ragged_dot binds) with W a QArray of
stacked experts [E, K, N] quantised along K (`qkern.quantize(w, fmt, axis=-2)`) goes to
the ragged quantised matmul (`qkern.pallas.ragged_qmatmul`), which never dequantises an
expert whole and reads only the experts that rows are routed to.

What takes the kernel: x 2-D (its one contracting and one ragged, i.e. row, dimension in
either order), no batch dimensions, W 3-D with the group dimension stored first and its
blocks along the stored axis 1. Contracting W's block axis is `x @ W_e`; contracting its
other axis is `x @ W_e.T`, the transposed kernel on the same storage. Everything else is
computed correctly by the core's default (every expert dequantised, then the dense
ragged_dot): a QArray as x, group_offset, batch dimensions, the ragged-contracting and
ragged-batch modes, blocks along another axis, per-call group sizes of a batch
(group_sizes of rank > 1), integer x. Double-quantised scales are undone first (the
second level is blocked over the whole stack, not per expert).

W8A8 (`act_fmt="int8"`): `x @ W_e` quantises x to int8 (per row, or by the calibrated
static scale) and each window runs the 2-D W8A8 kernel; `x @ W_e.T` runs weight-only, as
for 2-D weights. Under `qkern.calibrate` the activation's absmax is recorded and the
product runs weight-only.
"""

from __future__ import annotations

import jax.numpy as jnp

from .._compat import ragged_dot_general_p
from .._core import ArrayLike, Value, register
from ..formats._quantize import dequantize_scales
from ..pallas.ragged_qmatmul import StackedOperand, ragged_qmatmul
from ..pallas.ragged_qmatmul.base import check_group_sizes
from ._qarray_matmul import (default_in_compute_dtype, dense_dtypes, static_act_scale,
                             without_double_quant)
from .qarray import QArray


def stacked_operand(w: QArray) -> StackedOperand | None:
    """The kernel operand of a 3-D QArray stored [E, K, N] with blocks along K (ignoring a
    pending transpose), or None for any other storage."""
    lay = w.layout
    if len(lay.shape) != 3 or lay.axis != 1:
        return None
    w = without_double_quant(w)
    fmt = w.format
    scales = dequantize_scales(w.scales, None, None, fmt)
    zeros = w.zeros
    if lay.per_tensor:
        e, n = lay.shape[0], lay.shape[2]
        scales = jnp.broadcast_to(jnp.reshape(scales, (1, 1, 1)), (e, 1, n))
        zeros = None if zeros is None else jnp.broadcast_to(jnp.reshape(zeros, (1, 1, 1)),
                                                            (e, 1, n))
    return StackedOperand(w.data, scales, zeros, fmt, lay.block_size, lay.shape[1])


def _layout(x, w: QArray, group_sizes, params):
    """(x's contracting axis, transposed) when the kernel takes this call, else None."""
    if params.get("group_offset") is not None:
        return None
    dn = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    if lb or rb or len(lc) != 1 or jnp.ndim(x) != 2 or w.ndim != 3 or jnp.ndim(group_sizes) != 1:
        return None
    ragged, groups = tuple(dn.lhs_ragged_dimensions), tuple(dn.rhs_group_dimensions)
    if len(ragged) != 1 or ragged[0] == lc[0] or len(groups) != 1:
        return None
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return None
    stored = lambda a: a if w.perm is None else w.perm[a]
    if stored(groups[0]) != 0 or w.layout.axis != 1 or stored(rc[0]) not in (1, 2):
        return None
    return lc[0], stored(rc[0]) == 2


@register(ragged_dot_general_p)
def _(x: ArrayLike, w: QArray, group_sizes: ArrayLike, **params):
    w = w.fitted()
    layout = _layout(x, w, group_sizes, params)
    op = None if layout is None else stacked_operand(w)
    if op is None:
        return default_in_compute_dtype(ragged_dot_general_p, [x, w, group_sizes], params)
    x_axis, transposed = layout
    # Bad shapes are named here, before lax's own shape rule (run by `dense_dtypes`) sees them.
    xm = jnp.moveaxis(jnp.asarray(x), x_axis, -1)                   # [M, K] (or [M, N])
    want = op.n if transposed else op.k
    if xm.shape[1] != want:
        raise ValueError(f"ragged_dot: x {jnp.shape(x)} contracts {xm.shape[1]} values per "
                         f"row with the quantised experts {w.logical_shape} along their "
                         f"{'N' if transposed else 'K'}={want}.")
    check_group_sizes(group_sizes, op.experts, xm.shape[0])
    out_dtype, compute = dense_dtypes(ragged_dot_general_p, (x, w, group_sizes), params, x,
                                      w.dtype, w.compute_dtype)
    xm = xm.astype(compute)
    kw = {}
    if w.act_fmt is not None and not transposed:
        record = getattr(w, "record_activation", None)
        if record is not None:            # under qkern.calibrate: record, run weight-only
            record(xm)
        else:
            kw = dict(w8a8=True, act_scale=static_act_scale(w))
    return ragged_qmatmul(xm, op, group_sizes, transposed=transposed, **kw).astype(out_dtype)
