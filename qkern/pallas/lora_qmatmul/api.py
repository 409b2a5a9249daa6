"""Fused QLoRA matmul: `x @ W + scale * (x @ u) @ v` with W quantised, in one kernel.

    y = lora_qmatmul(x, op, u, v, scale)                   # x [..., K], W [K, N], u [K, r], v [r, N]
    y = lora_qmatmul(x, op, u, v, scale, transposed=True)  # x [..., N] @ W.T, u [N, r], v [r, K]

A LoraArray `w + s * a @ b` with a quantised base calls this with (u, v) = (a, b) for
`x @ w`, and with (u, v) = (b.T, a.T) for `x @ w.T`. Each backend's kernel reads every x
tile once for both products: the base tile `x @ dequant(W)` and the low-rank projection
`x @ u`, whose [M, r] result is also returned (the backward pass reuses it).

Backends, from the backend table: "triton" (`_triton.py`), "mosaic_tpu" (`_mosaic.py`),
"xla" (`_xla.py`: the xla quantised matmul plus two small dots). Configs: an argument, else
the autotune cache's winner for the "lora" / "lora_t" problem of this rank (`qkern tune
--kernels lora`), else the heuristic (on xla: qmatmul's tuned config for the base product).

Gradients (custom_vjp): with g = dy @ v.T,
    dx = dy @ W.T + scale * g @ u.T     -- the same fused kernel, transposed, with (v.T, u.T)
    du = scale * x.T @ g,   dv = scale * (x @ u).T @ dy
and the frozen quantised weight gets a zero cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _backend
from .._config import MatmulConfig, Problem, config_for
from .base import check_factors
from .._operand import QOperand
from ..._compat import explicit_sharding, sum_like
from ..qmatmul._xla import dot
from ..qmatmul.api import _zero_cotangent, like_input
from . import _mosaic, _triton, _xla

FAMILY = "lora_qmatmul"
_backend.register(FAMILY, xla=_xla, triton=_triton, mosaic_tpu=_mosaic)

_F32 = jnp.float32


def _fused(x2, op, u, v, scale, sel, config, transposed):
    if x2.shape[0] == 0:                                  # no rows: nothing to launch
        return (jnp.zeros((0, v.shape[1]), x2.dtype), jnp.zeros((0, u.shape[1]), _F32))
    module, _ = _backend.implementation(FAMILY, sel)
    return module.forward(x2, op, u, v, scale, config, transposed=transposed,
                          interpret=sel.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _lora2(x2, op, u, v, scale, sel, config, transposed):
    return _fused(x2, op, u, v, scale, sel, config, transposed)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _pair(x2, op, u, v, scale, sel, config, transposed):
    """(y, x @ u): both results of the fused kernel, both differentiable. The forward and
    backward passes call this, never the bare kernel, so a gradient is differentiable
    again (grad of grad)."""
    return _fused(x2, op, u, v, scale, sel, config, transposed)


def _lora2_fwd(x2, op, u, v, scale, sel, config, transposed):
    y, xu = _pair(x2, op, u, v, scale, sel, config, transposed)
    return y, (x2, op, u, v, xu)


def _pair_fwd(x2, op, u, v, scale, sel, config, transposed):
    y, xu = _pair(x2, op, u, v, scale, sel, config, transposed)
    return (y, xu), (x2, op, u, v, xu)


def _backward(scale, sel, transposed, res, dy, dxu=None):
    x2, op, u, v, xu = res
    # The backward direction picks its own config: the forward's was chosen for its shape.
    dx, g = _pair(dy, op, jnp.swapaxes(v, 0, 1), jnp.swapaxes(u, 0, 1), scale, sel, None,
                  not transposed)
    du = scale * dot(x2.T.astype(_F32), g)
    dv = scale * dot(xu.T, dy)
    if dxu is not None:                   # the cotangent of x @ u (only `_pair` returns it)
        dx = dx.astype(_F32) + dot(dxu, jnp.swapaxes(u, 0, 1).astype(_F32))
        du = du + dot(x2.T.astype(_F32), dxu)
    # On an Explicit mesh each cotangent takes its input's sharding; inside shard_map a
    # factor replicated over an axis the activations vary over gets the sum of every
    # shard's contribution (as JAX's transpose of the implicit pvary would give).
    return (like_input(dx.astype(x2.dtype), explicit_sharding(x2)),
            jax.tree_util.tree_map(_zero_cotangent, op),
            like_input(sum_like(du, u).astype(u.dtype), explicit_sharding(u)),
            like_input(sum_like(dv, v).astype(v.dtype), explicit_sharding(v)))


def _lora2_bwd(scale, sel, config, transposed, res, dy):
    return _backward(scale, sel, transposed, res, dy)


def _pair_bwd(scale, sel, config, transposed, res, cts):
    dy, dxu = cts
    return _backward(scale, sel, transposed, res, dy, dxu.astype(_F32))


_lora2.defvjp(_lora2_fwd, _lora2_bwd)
_pair.defvjp(_pair_fwd, _pair_bwd)


def lora_qmatmul(x: jax.Array, op: QOperand, u: jax.Array, v: jax.Array, scale: float, *,
                 transposed: bool = False, backend: str | None = None,
                 config: MatmulConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """x[..., K] @ W + scale * (x @ u) @ v with W [K, N] quantised (or, transposed,
    x[..., N] @ W.T + ...). Leading dims of x are flattened into M; accumulates in float32
    and returns x's dtype. Differentiable in x, u and v; W is frozen."""
    _, sel = _backend.implementation(FAMILY, _backend.resolve(backend, interpret), op)
    din, dout = (op.n, op.k) if transposed else (op.k, op.n)
    lead, k = x.shape[:-1], x.shape[-1]
    if k != din:
        raise ValueError(f"lora_qmatmul: x has {k} columns but the quantised weight "
                         f"[K={op.k}, N={op.n}]{'.T' if transposed else ''} takes {din}.")
    r = check_factors(u, v, din, dout, "lora_qmatmul")
    x2 = x.reshape(-1, k)
    if config is None:  # the autotune cache's winner; on a miss each backend's heuristic
        config = config_for(Problem.of(sel.name, x2, op, "lora_t" if transposed else "lora", r),
                            interpret=sel.interpret, heuristic=False)
    y = _lora2(x2, op, u, v, float(scale), sel, config, transposed)
    return y.reshape(*lead, dout)
