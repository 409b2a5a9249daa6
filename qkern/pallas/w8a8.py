"""W8A8 matmul: int8 activations times an int8 weight, int32 accumulation, both scales.

    y = w8a8_matmul(x, op)                # x [..., K] float, op an int8 QOperand of W [K, N]
    y = w8a8_matmul(x, op, act_scale=s)   # static per-tensor activation scale (calibrated)

Activations: act_scale=None quantises each row of x on the fly by its absmax (dynamic);
a scalar float act_scale quantises the whole tensor as clip(round(x / act_scale), -127, 127)
(static, e.g. from calibration). The weight is symmetric int8, per channel, per tensor or
per block along K.

Backends, chosen as for `qmatmul` (an argument, `qkern.backend(...)`, `QKERN_BACKEND`, the
device): "triton" (_triton_w8a8.py), "mosaic_tpu" (_mosaic_w8a8.py), "xla" (_xla_w8a8.py,
every device). All three quantise x with the same XLA pre-pass, so they feed their int8
products identical codes.

Gradients: straight-through on the activation rounding, so d/dx is dy @ W.T, run by the
weight-only transposed kernel of the same backend (`qmatmul`'s); the frozen weight and
act_scale get zero cotangents.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _backend
from ._config import MatmulConfig
from ._operand import QOperand
from ._xla_w8a8 import check_act_scale, check_w8a8_operand, w8a8_xla
from .._compat import explicit_sharding
from .qmatmul import _run, _zero_cotangent, like_input

__all__ = ["w8a8_matmul"]


def _forward(x2, op, act_scale, sel: _backend.Selection, config):
    if sel.name == "triton":
        from ._triton_w8a8 import w8a8_triton
        return w8a8_triton(x2, op, config, act_scale=act_scale, interpret=sel.interpret)
    if sel.name == "mosaic_tpu":
        from ._mosaic_w8a8 import w8a8_mosaic
        return w8a8_mosaic(x2, op, config, act_scale=act_scale, interpret=sel.interpret)
    return w8a8_xla(x2, op, act_scale, config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _w8a8_2d(x2, op, act_scale, sel, config, x_sharding):
    return _forward(x2, op, act_scale, sel, config)


def _fwd(x2, op, act_scale, sel, config, x_sharding):
    return _forward(x2, op, act_scale, sel, config), (op, act_scale)


def _bwd(sel, config, x_sharding, res, dy):
    op, act_scale = res
    # Straight-through: the rounding of x is treated as the identity. The forward config
    # was chosen for W8A8, so the transposed weight-only kernel picks its own.
    dx = like_input(_run(dy, op, sel, None, transposed=True), x_sharding)
    d_scale = None if act_scale is None else jnp.zeros_like(act_scale)
    return dx, jax.tree_util.tree_map(_zero_cotangent, op), d_scale


_w8a8_2d.defvjp(_fwd, _bwd)


def w8a8_matmul(x: jax.Array, op: QOperand, *, act_scale=None, backend: str | None = None,
                config: MatmulConfig | None = None,
                interpret: bool | None = None) -> jax.Array:
    """x[..., K] @ W[K, N] with x quantised to int8; returns x's dtype.

    act_scale: None (dynamic: each row of x by its absmax / 127) or a scalar float
    (array or Python number; traced is fine): one static scale for the whole tensor,
    x quantised as clip(round(x / act_scale), -127, 127).
    backend / interpret: as for `qmatmul` (None: the `qkern.backend` block, then
    QKERN_BACKEND, then the device). config: a MatmulConfig for the chosen backend (the
    xla backend reads only block_k, its K chunk); None: the heuristic defaults.

        op = qkern.pallas.stored_operand(qkern.quantize(w, "int8"))
        y = w8a8_matmul(x, op)                              # dynamic per-row scales
        y = w8a8_matmul(x, op, act_scale=jnp.float32(0.05)) # calibrated, static
    """
    check_w8a8_operand(op)
    act_scale = check_act_scale(act_scale)
    sel = _backend.resolve(backend, interpret)
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"w8a8_matmul: x must be floating point; got {jnp.result_type(x)}.")
    if getattr(x, "ndim", 0) < 1:
        raise ValueError(f"w8a8_matmul: x must have a last dimension K={op.k}; got a scalar.")
    lead, k = x.shape[:-1], x.shape[-1]
    if k != op.k:
        raise ValueError(f"w8a8_matmul: x has {k} columns but the weight's K is {op.k} "
                         f"(x shape {x.shape}, weight [K={op.k}, N={op.n}]).")
    x2 = x.reshape(-1, k)
    y = _w8a8_2d(x2, op, act_scale, sel, config, explicit_sharding(x2))
    return y.reshape(*lead, op.n)
