"""W8A8 matmul: int8 activations times an int8 weight, int32 accumulation, both scales.

    y = w8a8_matmul(x, op)                # x [..., K] float, op an int8 QOperand of W [K, N]
    y = w8a8_matmul(x, op, act_scale=s)   # static per-tensor activation scale (calibrated)

Activations: act_scale=None quantises each row of x on the fly by its absmax (dynamic);
a scalar float act_scale quantises the whole tensor as clip(round(x / act_scale), -127, 127)
(static, e.g. from calibration). The weight is symmetric int8, per channel, per tensor or
per block along K.

Backends, chosen as for `qmatmul` (an argument, `qkern.backend(...)`, `QKERN_BACKEND`, the
device) from the backend table: "triton" (`_triton.py`), "mosaic_tpu" (`_mosaic.py`), "xla"
(`_xla.py`, every device). All three quantise x with the same XLA pre-pass (base.py), so
they feed their int8 products identical codes. Configs: an argument, else the autotune
cache's winner for the "w8a8" problem (`qkern tune --kernels w8a8`), else the heuristic.

Derivatives (a `jax.custom_jvp`, forward and reverse mode): straight-through on the
activation rounding, so the tangent is dx @ W by the weight-only kernel of the same backend
(`qmatmul`'s linear primitive) and the gradient dy @ W.T by its transposed kernel; the
frozen weight and act_scale get none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _backend
from .._config import MatmulConfig, Problem, config_for
from .._operand import QOperand
from ..qmatmul.api import _qmatmul2
from . import _mosaic, _triton, _xla
from .base import check_act_scale, check_w8a8_operand

FAMILY = "w8a8"
_backend.register(FAMILY, xla=_xla, triton=_triton, mosaic_tpu=_mosaic)

__all__ = ["w8a8_matmul"]


def _forward(x2, op, act_scale, sel: _backend.Selection, config):
    if x2.shape[0] == 0:                  # no rows: nothing to launch (Pallas grids need one)
        return jnp.zeros((0, op.n), x2.dtype)
    module, _ = _backend.implementation(FAMILY, sel)
    return module.forward(x2, op, config, act_scale=act_scale, interpret=sel.interpret)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _w8a8_2d(x2, op, act_scale, sel, config):
    return _forward(x2, op, act_scale, sel, config)


@_w8a8_2d.defjvp
def _w8a8_2d_jvp(sel, config, primals, tangents):
    x2, op, act_scale = primals
    # Straight-through: the rounding of x is treated as the identity, so the tangent is
    # dx @ W by the weight-only kernel (a linear primitive: reverse mode transposes it to
    # dy @ W.T). `_w8a8_2d` itself for the value, so derivatives of any order go through
    # this rule, never through the rounding. The frozen weight and act_scale's tangents
    # are dropped, as their gradients are.
    y = _w8a8_2d(x2, op, act_scale, sel, config)
    return y, _qmatmul2(tangents[0], op, sel, None, False).astype(y.dtype)


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
    _, sel = _backend.implementation(FAMILY, _backend.resolve(backend, interpret), op)
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"w8a8_matmul: x must be floating point; got {jnp.result_type(x)}.")
    if getattr(x, "ndim", 0) < 1:
        raise ValueError(f"w8a8_matmul: x must have a last dimension K={op.k}; got a scalar.")
    lead, k = x.shape[:-1], x.shape[-1]
    if k != op.k:
        raise ValueError(f"w8a8_matmul: x has {k} columns but the weight's K is {op.k} "
                         f"(x shape {x.shape}, weight [K={op.k}, N={op.n}]).")
    x2 = x.reshape(-1, k)
    if config is None:  # the autotune cache's winner, else each backend's heuristic
        config = config_for(Problem.of(sel.name, x2, op, "w8a8"), interpret=sel.interpret)
    y = _w8a8_2d(x2, op, act_scale, sel, config)
    return y.reshape(*lead, op.n)
