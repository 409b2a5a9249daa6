"""Convolution with a quantised kernel.

    y = qconv(x, op, params)                      # weight-only, in the compute dtype
    y = qconv(x, op, params, w8a8=True)           # int8 activations per pixel (dynamic)
    y = qconv(x, op, params, w8a8=True, act_scale=s)   # one static activation scale

`params` are `lax.conv_general_dilated_p`'s (dimension numbers naming axes of the stored
kernel, explicit padding pairs, strides, dilations, feature and batch group counts), as the
QArray rule (`qkern/types/_qarray_conv.py`) receives them. Returns `compute` (x's dtype by
default); W8A8 computes in float32 and casts to it.

Backends: the backend table has an xla module only; on a GPU or TPU it runs there too (XLA's
convolution of the kernel dequantised piece by piece), with a warning once that the selected
backend has no qconv kernel.

Derivatives, forward and reverse mode, with respect to x only (the kernel is frozen: its
arrays get none). Weight-only: a linear primitive (`pallas/_linear.py`) whose transpose is
JAX's transpose of the same piecewise computation. W8A8: straight-through on the activation
rounding (a `jax.custom_jvp` whose tangent is the weight-only convolution).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _backend
from .._linear import LinearMap, linear
from . import _xla
from .base import ConvOperand, check, check_w8a8

FAMILY = "qconv"
_backend.register(FAMILY, xla=_xla)


def _freeze(params):
    """params as a hashable static argument."""
    return tuple(sorted(params.items(), key=lambda kv: kv[0]))


def _forward(x, op, act_scale, frozen, compute, w8a8):
    params = dict(frozen)
    module, _ = _backend.implementation(FAMILY, _backend.resolve())
    if w8a8:
        return module.forward_w8a8(x, op, params, act_scale).astype(compute)
    return module.forward(x, op, params, compute)


def _apply(x, *leaves, treedef, frozen, compute):
    return _forward(x, jax.tree_util.tree_unflatten(treedef, leaves), None, frozen, compute,
                    False)


def _apply_t(ct, *leaves, treedef, frozen, compute, x_type):
    # the weight-only convolution is linear in x: its transpose is JAX's transpose of the
    # same piecewise computation (a transposed convolution on the same kernel pieces)
    fwd = functools.partial(_apply, treedef=treedef, frozen=frozen, compute=compute)
    dx, = jax.linear_transpose(lambda v: fwd(v, *leaves), x_type)(ct.astype(compute))
    return dx


@functools.lru_cache(maxsize=None)
def _linear_map(treedef, frozen, compute, x_shape, x_dtype) -> LinearMap:
    kw = dict(treedef=treedef, frozen=frozen, compute=compute)
    return LinearMap(functools.partial(_apply, **kw),
                     functools.partial(_apply_t, x_type=jax.ShapeDtypeStruct(x_shape, x_dtype),
                                       **kw), "qconv")


def _qconv_linear(x, op, frozen, compute):
    leaves, treedef = jax.tree_util.tree_flatten(op)
    fn = _linear_map(treedef, frozen, jnp.dtype(compute), tuple(x.shape), jnp.dtype(x.dtype))
    return linear(x, leaves, fn)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _qconv_w8a8(x, op, act_scale, frozen, compute):
    return _forward(x, op, act_scale, frozen, compute, True)


@_qconv_w8a8.defjvp
def _qconv_w8a8_jvp(frozen, compute, primals, tangents):
    x, op, act_scale = primals
    # straight-through on the activation rounding: the tangent is the weight-only
    # convolution of dx; `_qconv_w8a8` itself for the value, so derivatives of any order
    # come here, never through the rounding of x
    y = _qconv_w8a8(x, op, act_scale, frozen, compute)
    return y, _qconv_linear(tangents[0], op, frozen, compute).astype(y.dtype)


def _qconv(x, op, act_scale, frozen, compute, w8a8):
    if w8a8:
        return _qconv_w8a8(x, op, act_scale, frozen, compute)
    return _qconv_linear(x, op, frozen, compute)


def qconv(x: jax.Array, op: ConvOperand, params: dict, *, compute=None, w8a8: bool = False,
          act_scale=None) -> jax.Array:
    """`lax.conv_general_dilated_p` of x with the quantised kernel `op` (see the module
    docstring); `compute`: the dtype to compute and return in (default x's)."""
    check(x, op, params)
    if w8a8:
        check_w8a8(op, params)
    compute = jnp.dtype(compute if compute is not None else jnp.result_type(x))
    if act_scale is not None:
        act_scale = jnp.asarray(act_scale, jnp.float32)
    return _qconv(x, op, act_scale, _freeze(params), compute, bool(w8a8))
