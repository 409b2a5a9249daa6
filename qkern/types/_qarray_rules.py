"""Rules that keep a QArray quantised: transpose, dtype casts, reshapes and slices that
leave the block axis alone, and matmuls in either operand position. Anything else
materialises through the core's default."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .._core import ArrayLike, Value, register
from ._qarray_matmul import qmatmul_dispatch, without_double_quant
from .qarray import QArray

lax = jax.lax


def _physical(q: QArray, logical_axis: int) -> int:
    return logical_axis if q.perm is None else q.perm[logical_axis]


def _guarded_axes(q: QArray) -> set[int]:
    """Stored axes that slicing or reshaping must leave whole: the block/packing axis."""
    return {q.layout.axis}


def _with(q: QArray, **changes) -> QArray:
    return dataclasses.replace(q, **changes)


def _per_block_fields(q: QArray):
    return [f for f in ("scales", "zeros") if getattr(q, f) is not None]


# -- transpose: metadata only ------------------------------------------------------------
@register(lax.transpose_p)
def _(q: QArray, *, permutation):
    q = q.fitted()
    old = q.perm if q.perm is not None else tuple(range(len(q.layout.shape)))
    new = tuple(old[p] for p in permutation)
    return _with(q, perm=None if new == tuple(range(len(new))) else new)


# -- dtype casts change the compute dtype -------------------------------------------------
@register(lax.convert_element_type_p)
def _(q: QArray, *, new_dtype, **params):
    if jnp.issubdtype(new_dtype, jnp.floating):
        return _with(q, dtype=np.dtype(new_dtype))
    return Value.default(lax.convert_element_type_p, [q], dict(new_dtype=new_dtype, **params))


# -- reshape: not across the block axis ----------------------------------------------------
@register(lax.reshape_p)
def _(q: QArray, *, new_sizes, dimensions=None, **params):
    q = q.fitted()
    new_sizes = tuple(int(d) for d in new_sizes)
    lay = q.layout
    if q.perm is not None or dimensions is not None:
        return Value.default(lax.reshape_p, [q], dict(new_sizes=new_sizes, dimensions=dimensions, **params))
    a, s = lay.axis, lay.shape
    before, after = math.prod(s[:a]), math.prod(s[a + 1:])
    for j, d in enumerate(new_sizes):
        if d == s[a] and math.prod(new_sizes[:j]) == before and math.prod(new_sizes[j + 1:]) == after:
            break
    else:
        return Value.default(lax.reshape_p, [q], dict(new_sizes=new_sizes, dimensions=None, **params))

    def re(x, mid):
        if x.shape == (1,) * x.ndim and lay.per_tensor:
            return x.reshape((1,) * len(new_sizes))
        return x.reshape(new_sizes[:j] + (mid,) + new_sizes[j + 1:])

    changes = {f: re(getattr(q, f), getattr(q, f).shape[a]) for f in _per_block_fields(q)}
    return _with(q, data=re(q.data, q.data.shape[a]),
                 layout=dataclasses.replace(lay, shape=new_sizes, axis=j), **changes)


# -- slicing along other axes --------------------------------------------------------------
@register(lax.slice_p)
def _(q: QArray, *, start_indices, limit_indices, strides):
    q = q.fitted()
    n = len(q.layout.shape)
    strides = strides or (1,) * n
    phys = [None] * n
    for i in range(n):
        phys[_physical(q, i)] = (start_indices[i], limit_indices[i], strides[i])
    for ax in _guarded_axes(q):
        st, lim, sd = phys[ax]
        if (st, lim, sd) != (0, q.layout.shape[ax], 1):
            return Value.default(lax.slice_p, [q], dict(start_indices=start_indices,
                                                 limit_indices=limit_indices, strides=strides))

    q = without_double_quant(q)

    def cut(x):
        starts, limits, steps = [], [], []
        for ax, (st, lim, sd) in enumerate(phys):
            if ax in _guarded_axes(q) or x.shape[ax] == 1 and q.layout.shape[ax] != 1:
                starts.append(0); limits.append(x.shape[ax]); steps.append(1)
            else:
                starts.append(st); limits.append(lim); steps.append(sd)
        return lax.slice(x, starts, limits, steps)

    new_shape = tuple(len(range(st, lim, sd)) for st, lim, sd in phys)
    changes = {f: cut(getattr(q, f)) for f in _per_block_fields(q)}
    return _with(q, data=cut(q.data), layout=dataclasses.replace(q.layout, shape=new_shape),
                 **changes)


@register(lax.dynamic_slice_p)
def _(q: QArray, *starts: ArrayLike, slice_sizes):
    q = q.fitted()
    n = len(q.layout.shape)
    phys_start, phys_size = [None] * n, [None] * n
    for i in range(n):
        phys_start[_physical(q, i)], phys_size[_physical(q, i)] = starts[i], slice_sizes[i]
    for ax in _guarded_axes(q):
        if phys_size[ax] != q.layout.shape[ax]:
            return Value.default(lax.dynamic_slice_p, [q, *starts], dict(slice_sizes=slice_sizes))

    q = without_double_quant(q)

    def cut(x):
        st, sz = [], []
        for ax in range(n):
            if ax in _guarded_axes(q) or x.shape[ax] == 1 and q.layout.shape[ax] != 1:
                st.append(0); sz.append(x.shape[ax])
            else:
                st.append(phys_start[ax]); sz.append(phys_size[ax])
        return lax.dynamic_slice(x, st, sz)

    changes = {f: cut(getattr(q, f)) for f in _per_block_fields(q)}
    return _with(q, data=cut(q.data), layout=dataclasses.replace(q.layout, shape=tuple(phys_size)),
                 **changes)


@register(lax.squeeze_p)
def _(q: QArray, *, dimensions):
    q = q.fitted()
    phys = sorted(_physical(q, d) for d in dimensions)
    if any(ax in _guarded_axes(q) for ax in phys):
        return Value.default(lax.squeeze_p, [q], dict(dimensions=dimensions))
    lay = q.layout
    keep = [ax for ax in range(len(lay.shape)) if ax not in phys]
    renumber = {old: new for new, old in enumerate(keep)}
    perm = None
    if q.perm is not None:
        perm = tuple(renumber[p] for p in q.perm if p in renumber)
        perm = None if perm == tuple(range(len(perm))) else perm
    changes = {f: lax.squeeze(getattr(q, f), phys) for f in _per_block_fields(q)}
    new_layout = dataclasses.replace(lay, shape=tuple(lay.shape[ax] for ax in keep),
                                     axis=renumber[lay.axis])
    return _with(q, data=lax.squeeze(q.data, phys), layout=new_layout, perm=perm, **changes)


# -- matmul --------------------------------------------------------------------------------
def _matmul(lhs, rhs, params):
    """The XLA path: correct for every layout. The Pallas kernels take the canonical one."""
    return qmatmul_dispatch(lhs, rhs, params)


@register(lax.dot_general_p)
def _(x: ArrayLike, w: QArray, **params):
    return _matmul(x, w, params)


@register(lax.dot_general_p)
def _(w: QArray, x: ArrayLike, **params):
    return _matmul(w, x, params)


@register(lax.dot_general_p)
def _(a: QArray, b: QArray, **params):
    return _matmul(a, b, params)
