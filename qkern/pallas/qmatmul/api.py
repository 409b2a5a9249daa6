"""Weight-only quantised matmul: backend selection, gradients, and the fallback chain.

    y = qmatmul(x, op)          # x [..., K] float, op a QOperand of W [K, N]

Backends, registered in the backend table (`pallas/_backend.py`): "xla" (`_xla.py`, with
the native CPU kernel in `_native/`), "triton" (`_triton.py`), "mosaic_tpu" (`_mosaic.py`).
A backend that cannot run an operand falls back to xla there. The gradient with respect to x runs the same
family on the transposed weight (`dy @ W.T`, from the same storage); the quantised weight
is frozen and gets no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..._compat import explicit_sharding, vary_like
from .. import _backend
from .._config import MatmulConfig, Problem, config_for
from .._operand import QOperand
from . import _mosaic, _triton, _xla
from ._xla import dot

FAMILY = "qmatmul"
_KERNEL = {False: "qmatmul", True: "qmatmul_t"}      # Problem.kernel by direction
_backend.register(FAMILY, xla=_xla, triton=_triton, mosaic_tpu=_mosaic)


def _run(x2, op, sel: _backend.Selection, config, transposed: bool):
    if x2.shape[0] == 0:                  # no rows: nothing to launch (Pallas grids need one)
        return jnp.zeros((0, op.k if transposed else op.n), x2.dtype)
    if config is None:  # the autotune cache's winner for this device, else the heuristic
        config = config_for(Problem.of(sel.name, x2, op, _KERNEL[transposed]),
                            interpret=sel.interpret)
    if config is not None and config.dequantize:
        return _dequantize_dot(x2, op, transposed)
    module, _ = _backend.implementation(FAMILY, sel)
    kernel = module.transposed if transposed else module.forward
    return kernel(x2, op, config, interpret=sel.interpret)


def _dequantize_dot(x2, op, transposed: bool):
    """x @ W (or dy @ W.T) with W dequantised to x's dtype and XLA's dot (float32
    accumulation): `MatmulConfig(dequantize=True)`, for large M where it beats a kernel."""
    w = _xla.dequantized(op, after=x2).astype(x2.dtype)   # decoded just before this dot
    y = dot(x2, w.T if transposed else w, jnp.float32)
    return y.astype(x2.dtype)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        sharding = explicit_sharding(a)      # Explicit mesh: the zero has a's sharding
        zero = jnp.zeros(a.shape, a.dtype, **({} if sharding is None else {"out_sharding": sharding}))
        return vary_like(zero, a)           # and inside shard_map, a's varying axes
    return jnp.zeros(a.shape, jax.dtypes.float0)


def like_input(dx, x_sharding):
    """A cotangent given its input's type: on an Explicit mesh (`x_sharding`, static, from
    `explicit_sharding(x)`) the kernel's result is resharded to x's sharding."""
    return dx if x_sharding is None else jax.sharding.reshard(dx, x_sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _qmatmul2(x2, op, sel, config, transposed, x_sharding):
    return _run(x2, op, sel, config, transposed)


def _qmatmul2_fwd(x2, op, sel, config, transposed, x_sharding):
    # The forward and backward call `_qmatmul2` itself, never the bare kernel, so the
    # gradient is differentiable again (grad of grad, jacrev of jacrev).
    return _qmatmul2(x2, op, sel, config, transposed, x_sharding), op


def _qmatmul2_bwd(sel, config, transposed, x_sharding, op, dy):
    # d(x @ W)/dx is (dy @ W.T), and the other way round: the same family, flipped. The
    # config was chosen for the forward direction, so the backward picks its own.
    dx = _qmatmul2(dy, op, sel, None, not transposed, explicit_sharding(dy))
    return like_input(dx, x_sharding), jax.tree_util.tree_map(_zero_cotangent, op)


_qmatmul2.defvjp(_qmatmul2_fwd, _qmatmul2_bwd)


def qmatmul(x: jax.Array, op: QOperand, *, transposed: bool = False, backend: str | None = None,
            config: MatmulConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """x[..., K] @ W[K, N] (or, transposed, x[..., N] @ W.T) with W quantised.

    Leading dims of x are flattened into M. Accumulates in float32; returns x's dtype.
    """
    _, sel = _backend.implementation(FAMILY, _backend.resolve(backend, interpret), op)
    lead, k = x.shape[:-1], x.shape[-1]
    want = op.n if transposed else op.k
    if k != want:
        raise ValueError(
            f"qmatmul: x has {k} columns but the quantised weight's "
            f"{'N' if transposed else 'K'} is {want} (weight [K={op.k}, N={op.n}]).")
    x2 = x.reshape(-1, k)
    if config is None:  # here, not only in _run: jax caches the custom_vjp's traced forward
        config = config_for(Problem.of(sel.name, x2, op, _KERNEL[transposed]),
                            interpret=sel.interpret)
    y = _qmatmul2(x2, op, sel, config, transposed, explicit_sharding(x2))
    return y.reshape(*lead, y.shape[-1])
