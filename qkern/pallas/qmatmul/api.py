"""Weight-only quantised matmul: backend selection, gradients, and the fallback chain.

    y = qmatmul(x, op)          # x [..., K] float, op a QOperand of W [K, N]

Backends, registered in the backend table (`pallas/_backend.py`): "xla" (`_xla.py`, with
the native CPU kernel in `_native/`), "triton" (`_triton.py`), "mosaic_tpu" (`_mosaic.py`).
A backend that cannot run an operand falls back to xla there. The product is linear in x:
it is bound as the `qkern_linear` primitive (`pallas/_linear.py`), so forward and reverse
mode both work; its transpose, the gradient, runs the same family on the transposed weight
(`dy @ W.T`, from the same storage). The quantised weight is frozen and gets no derivative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _backend
from .._config import MatmulConfig, Problem, config_for
from .._linear import LinearMap, linear
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


def _apply(x2, *leaves, treedef, sel, config, transposed):
    return _run(x2, jax.tree_util.tree_unflatten(treedef, leaves), sel, config, transposed)


@functools.lru_cache(maxsize=None)
def linear_map(treedef, sel, config, transposed: bool) -> LinearMap:
    """x2 @ W (or x2 @ W.T) as a linear map; its transpose runs the same family, flipped.
    The config was chosen for one direction, so the other picks its own."""
    fwd = functools.partial(_apply, treedef=treedef, sel=sel, config=config,
                            transposed=transposed)
    bwd = functools.partial(_apply, treedef=treedef, sel=sel, config=None,
                            transposed=not transposed)
    return LinearMap(fwd, bwd, "qmatmul")


def _qmatmul2(x2, op, sel, config, transposed):
    leaves, treedef = jax.tree_util.tree_flatten(op)
    return linear(x2, leaves, linear_map(treedef, sel, config, transposed))


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
    if config is None:  # here, not only in _run: the linear map is cached by its config
        config = config_for(Problem.of(sel.name, x2, op, _KERNEL[transposed]),
                            interpret=sel.interpret)
    y = _qmatmul2(x2, op, sel, config, transposed)
    return y.reshape(*lead, y.shape[-1])
