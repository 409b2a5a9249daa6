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

Derivatives, forward and reverse mode (a `jax.custom_jvp`): the tangent is
    dy = [dx @ W + scale * (dx @ u) @ v] + scale * ((x @ du) @ v + (x @ u) @ dv)
where the bracket is the fused kernel as a linear primitive in dx (`pallas/_linear.py`),
whose transpose, the gradient, is the same fused kernel flipped with (v.T, u.T):
    dx = dy @ W.T + scale * (dy @ v.T) @ u.T,
    du = scale * x.T @ (dy @ v.T),   dv = scale * (x @ u).T @ dy   (by JAX, from the rest).
The frozen quantised weight gets no derivative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .. import _backend
from .._config import MatmulConfig, Problem, config_for
from .base import check_factors
from .._operand import QOperand
from ..._compat import vary_like
from .._linear import LinearMap, linear
from ..qmatmul._xla import dot
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


def _apply(x2, *consts, treedef, scale, sel, config, transposed, flip):
    """The fused kernel as a linear map in x2 (u, v fixed): x2 @ W + scale * (x2 @ u) @ v,
    or with flip its transpose, x2 @ W.T + scale * (x2 @ v.T) @ u.T (the same kernel
    flipped), which the backward pass runs."""
    *leaves, u, v = consts
    op = jax.tree_util.tree_unflatten(treedef, leaves)
    if flip:
        u, v = jnp.swapaxes(v, 0, 1), jnp.swapaxes(u, 0, 1)
    return _fused(x2, op, u, v, scale, sel, config, transposed != flip)[0]


def _apply_dc(x2, *args, scale, flip):
    """How `_apply` changes with u and v (their tangents du, dv): the low-rank term's."""
    half = len(args) // 2
    u, v = args[half - 2:half]
    du, dv = args[-2:]
    x = x2.astype(_F32)
    if flip:     # d(scale * (x @ v.T) @ u.T)
        return scale * (dot(dot(x, dv.T), u.T) + dot(dot(x, v.T), du.T))
    return scale * (dot(dot(x, du), v) + dot(dot(x, u), dv))


@functools.lru_cache(maxsize=None)
def _linear_map(treedef, scale, sel, config, transposed) -> LinearMap:
    # The backward direction picks its own config: the forward's was chosen for its shape.
    kw = dict(treedef=treedef, scale=scale, sel=sel, transposed=transposed)
    return LinearMap(functools.partial(_apply, config=config, flip=False, **kw),
                     functools.partial(_apply, config=None, flip=True, **kw),
                     "lora_qmatmul",
                     functools.partial(_apply_dc, scale=scale, flip=False),
                     functools.partial(_apply_dc, scale=scale, flip=True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _lora_pair(x2, op, u, v, scale, sel, config, transposed):
    """(y, x @ u): both results of the fused kernel, both differentiable."""
    return _fused(x2, op, u, v, scale, sel, config, transposed)


def _lora_pair_jvp(scale, sel, config, transposed, primals, tangents):
    x2, op, u, v = primals
    dx, _, du, dv = tangents                  # the frozen weight's tangent is dropped
    # `_lora_pair` itself for the value, so derivatives of any order come back here
    y, xu = _lora_pair(x2, op, u, v, scale, sel, config, transposed)
    dy = jnp.zeros(y.shape, _F32)
    dxu = jnp.zeros(xu.shape, _F32)
    if not isinstance(dx, SymbolicZero):
        # dx @ W + scale * (dx @ u) @ v: the fused kernel as a linear primitive, whose
        # transpose (the gradient) is the same kernel flipped
        leaves, treedef = jax.tree_util.tree_flatten(op)
        fn = _linear_map(treedef, scale, sel, config, transposed)
        dy = dy + linear(dx, (*leaves, u, v), fn).astype(_F32)
        dxu = dxu + dot(dx.astype(_F32), u.astype(_F32))
    if not isinstance(du, SymbolicZero):
        xdu = dot(x2.astype(_F32), du.astype(_F32))
        dy = dy + scale * dot(xdu, v.astype(_F32))
        dxu = dxu + xdu
    if not isinstance(dv, SymbolicZero):
        dy = dy + scale * dot(xu, dv.astype(_F32))
    return (y, xu), (vary_like(dy, y).astype(y.dtype), vary_like(dxu, xu))


_lora_pair.defjvp(_lora_pair_jvp, symbolic_zeros=True)


def _lora2(x2, op, u, v, scale, sel, config, transposed):
    return _lora_pair(x2, op, u, v, scale, sel, config, transposed)[0]


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
