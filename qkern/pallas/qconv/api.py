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

Gradients: with respect to x only (the kernel is frozen: its arrays get zero cotangents).
Weight-only: the gradient of the same piecewise computation. W8A8: straight-through on the
activation rounding, i.e. the weight-only gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _backend
from ..qmatmul.api import _zero_cotangent
from . import _xla
from .base import ConvOperand, check, check_w8a8

FAMILY = "qconv"
_backend.register(FAMILY, xla=_xla)


def _freeze(params):
    """params as a hashable static argument (custom_vjp's nondiff arguments)."""
    return tuple(sorted(params.items(), key=lambda kv: kv[0]))


def _forward(x, op, act_scale, frozen, compute, w8a8):
    params = dict(frozen)
    module, _ = _backend.implementation(FAMILY, _backend.resolve())
    if w8a8:
        return module.forward_w8a8(x, op, params, act_scale).astype(compute)
    return module.forward(x, op, params, compute)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _qconv(x, op, act_scale, frozen, compute, w8a8):
    return _forward(x, op, act_scale, frozen, compute, w8a8)


def _fwd(x, op, act_scale, frozen, compute, w8a8):
    # `_qconv` itself: differentiating the gradient again goes through this rule
    # (straight-through for W8A8), never through the rounding of x
    return _qconv(x, op, act_scale, frozen, compute, w8a8), (x, op, act_scale)


def _bwd(frozen, compute, w8a8, res, dy):
    x, op, act_scale = res
    # the weight-only convolution is linear in x: its vjp is the transposed convolution,
    # run on the same pieces of the kernel
    _, vjp = jax.vjp(lambda v: _forward(v, op, None, frozen, compute, False), x)
    (dx,) = vjp(dy.astype(compute))
    d_scale = None if act_scale is None else jnp.zeros_like(act_scale)
    return dx.astype(x.dtype), jax.tree_util.tree_map(_zero_cotangent, op), d_scale


_qconv.defvjp(_fwd, _bwd)


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
