"""Rules that keep a LoraArray low-rank: matmuls in either operand position (with batch
dimensions over its leading axes), transposes and float casts. A matmul with a quantised
base in the kernels' layout runs the fused QLoRA kernel; anything else materialises
`w + s * a @ b` through the core's default (the base behind a gradient stop)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._core import ArrayLike, Value, quaxify, register
from ..pallas import stored_operand
from ..pallas.lora_qmatmul import lora_qmatmul
from .lora import LoraArray
from ._qarray_matmul import default_in_compute_dtype, matmul_dtypes
from .qarray import QArray

lax = jax.lax
_F32 = jnp.float32


def _on_base(fn, w):
    """Apply a jnp function to the base, keeping a QArray quantised (through its rules)."""
    return quaxify(fn)(w) if isinstance(w, QArray) else fn(w)


def _with(lw: LoraArray, **changes) -> LoraArray:
    return dataclasses.replace(lw, **changes)


# -- matmuls ------------------------------------------------------------------------------
def _low_rank_layout(lw: LoraArray, w_contract, w_batch):
    """For a contraction over one of the last two axes with every leading axis a batch
    axis: (factor x meets first, its contracted axis, factor applied second, its r axis)."""
    n = lw.ndim
    if len(w_contract) != 1 or sorted(w_batch) != list(range(n - 2)):
        return None
    (c,) = w_contract
    if c == n - 2:                       # x @ W: contract `in` with a, then r with b
        return lw.a, n - 2, lw.b, n - 2
    if c == n - 1:                       # x @ W.T: contract `out` with b, then r with a
        return lw.b, n - 1, lw.a, n - 1
    return None


def _fused_kernel(x, lw: LoraArray, x_axis: int, w_axis: int, w_on_left: bool):
    """The fused QLoRA kernel for a 2-D quantised base, or None when it does not apply."""
    w = lw.w
    if lw.ndim != 2 or not isinstance(w, QArray) or not jnp.issubdtype(x.dtype, jnp.floating):
        return None
    if w.act_fmt is not None:       # a W8A8 base: its own kernel (x rounded), update in float
        return None
    w = w.fitted()                  # one layer of a stack (lax.scan, vmap) as its own QArray
    op = stored_operand(w)
    if op is None:
        return None
    physical = w_axis if w.perm is None else w.perm[w_axis]
    u, v = (lw.a, lw.b) if w_axis == 0 else (lw.b.T, lw.a.T)
    y = lora_qmatmul(jnp.moveaxis(x, x_axis, -1), op, u, v, lw.scale,
                     transposed=(physical == 1))                 # [...x free..., W free]
    return jnp.moveaxis(y, -1, 0) if w_on_left else y


def _matmul(x, lw: LoraArray, params, w_on_left: bool):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    xc, wc, xb, wb = (rc, lc, rb, lb) if w_on_left else (lc, rc, lb, rb)
    layout = _low_rank_layout(lw, wc, wb)
    lhs, rhs = (lw, x) if w_on_left else (x, lw)
    if layout is None:
        return default_in_compute_dtype(lax.dot_general_p, [lhs, rhs], params,
                                        getattr(lw.w, "compute_dtype", None))
    # Mixed precision as dense JAX (see _qarray_matmul.matmul_dtypes): bf16 x against a
    # float32 adapter computes in float32; a quantised base's `compute_dtype` sets it.
    out_dtype, compute = matmul_dtypes(lhs, rhs, params, x, lw.dtype,
                                       getattr(lw.w, "compute_dtype", None))
    x = x.astype(compute) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    if not xb and len(xc) == 1:
        y = _fused_kernel(x, lw, xc[0], wc[0], w_on_left)
        if y is not None:
            return y.astype(out_dtype)

    # Base: the ordinary dot_general against the frozen w (a QArray goes through its rules).
    w = lw.w if isinstance(lw.w, QArray) else lax.stop_gradient(lw.w)
    base = _on_base(lambda w: lax.dot_general(*((w, x) if w_on_left else (x, w)), **params), w)

    # Update: x meets the first factor on the same axes, then the r axis meets the second.
    first, first_axis, second, second_axis = layout
    nb = len(xb)
    xf = x.astype(jnp.promote_types(x.dtype, first.dtype))
    t = lax.dot_general(xf, first, ((xc, (first_axis,)), (xb, wb)),
                        preferred_element_type=_F32)            # [batch, x free, r]
    upd = lax.dot_general(t, second.astype(_F32), (((t.ndim - 1,), (second_axis,)),
                                                   (tuple(range(nb)), wb)))   # [batch, x free, W free]
    if w_on_left:
        upd = jnp.moveaxis(upd, -1, nb)                         # [batch, W free, x free]
    return (base.astype(_F32) + lw.scale * upd).astype(out_dtype)


@register(lax.dot_general_p)
def _(x: ArrayLike, lw: LoraArray, **params):
    return _matmul(x, lw, params, w_on_left=False)


@register(lax.dot_general_p)
def _(lw: LoraArray, x: ArrayLike, **params):
    return _matmul(x, lw, params, w_on_left=True)


# -- transposes keep the factors: (w + s a b).T = w.T + s b.T a.T ----------------------------
@register(lax.transpose_p)
def _(lw: LoraArray, *, permutation):
    n = lw.ndim
    perm = tuple(permutation)
    if set(perm[-2:]) != {n - 2, n - 1}:
        return Value.default(lax.transpose_p, [lw], dict(permutation=permutation))
    w = _on_base(lambda w: jnp.transpose(w, perm), lw.w)
    if perm[-2:] == (n - 2, n - 1):
        return _with(lw, w=w, a=jnp.transpose(lw.a, perm), b=jnp.transpose(lw.b, perm))
    swapped = (*perm[:-2], n - 1, n - 2)
    return _with(lw, w=w, a=jnp.transpose(lw.b, swapped), b=jnp.transpose(lw.a, swapped))


# -- float casts change the base's dtype; the factors keep theirs (they are trained) -------
@register(lax.convert_element_type_p)
def _(lw: LoraArray, *, new_dtype, **params):
    if not jnp.issubdtype(new_dtype, jnp.floating):
        return Value.default(lax.convert_element_type_p, [lw], dict(new_dtype=new_dtype, **params))
    return _with(lw, w=_on_base(lambda w: w.astype(new_dtype), lw.w))
