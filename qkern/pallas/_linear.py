"""A kernel that is linear in its input, as one JAX primitive: reverse and forward mode.

    y = linear(x, consts, LinearMap(apply, transpose, name))

`apply(x, *consts)` runs a kernel family (weight-only matmul, grouped matmul, convolution)
and is linear in `x`; `transpose(ct, *consts)` is its transpose, run by the same family on
the transposed weight. `consts` are the quantised weight's arrays: frozen, they get no
tangent and no cotangent (a tangent given for them is dropped, as the gradient is), unless
the map says how `apply` changes with them (`apply_dc`: QLoRA's factors).

Why a primitive and not `jax.custom_vjp`: JAX refuses forward mode (`jax.jvp`, `jacfwd`,
`hessian`, `linearize`) through a custom_vjp, and a `custom_jvp` whose tangent calls a
kernel cannot be transposed for reverse mode. A primitive with its own rules gets both:
  - jvp: the tangent is the same map applied to dx (linearity);
  - transpose: the transposed map applied to the cotangent;
  - batching: the map `jax.vmap`ped, as one primitive again (so vmap then jvp works);
  - lowering: `apply` inlined (its kernels choose by the lowering context as before).
Each rule binds the primitive again, so derivatives of any order, in any mix of modes,
keep running the kernels. Families that are not linear in x (W8A8's activation rounding,
QLoRA's adapter) use it for their tangent in a `jax.custom_jvp`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from .._compat import (aval_explicit_sharding, jaxpr_as_fun, lower_jaxpr, not_mapped,
                       trace_jaxpr, vary_like)


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """x -> apply(x, *consts), linear in x, and its transpose (static: hashable).

    apply_dc / transpose_dc (optional): the derivative of apply (transpose) with respect to
    its consts, `dc(x, *consts, *const_tangents)` in plain JAX, for consts that are not
    frozen (QLoRA's factors inside its fused kernel). Without one, const tangents are
    dropped: the consts are a frozen quantised weight."""
    apply: Callable
    transpose: Callable
    name: str
    apply_dc: Callable | None = None
    transpose_dc: Callable | None = None

    def __repr__(self) -> str:          # as printed in a jaxpr's qkern_linear equation
        return self.name

    @property
    def T(self) -> "LinearMap":
        return LinearMap(self.transpose, self.apply, self.name, self.transpose_dc,
                         self.apply_dc)


linear_p = Primitive("qkern_linear")


def linear(x: jax.Array, consts, fn: LinearMap) -> jax.Array:
    """`fn.apply(x, *consts)` as the primitive (see the module docstring)."""
    consts = tuple(consts)
    # Inside shard_map, x varies over every manual axis the weight does, so the
    # primitive's inputs agree; JAX's transpose of that cast sums x's cotangent over them.
    x = vary_like(x, *consts)
    # `fn.apply` traced here, once per bind: its jaxpr is the primitive's type and its
    # lowering, and printed inside `jax.make_jaxpr`'s output it shows which kernel runs.
    jaxpr = trace_jaxpr(fn.apply, *(jax.typeof(a) for a in (x, *consts)))
    return linear_p.bind(x, *consts, fn=fn, jaxpr=jaxpr)


def _impl(x, *consts, fn, jaxpr):
    # eager: the jaxpr traced at bind, op by op (the kernel's function runs once per call)
    return jaxpr_as_fun(jaxpr)(x, *consts)[0]


def _abstract_eval(x, *consts, fn, jaxpr):
    return jaxpr.out_avals[0]


def _lower(ctx, x, *consts, fn, jaxpr):
    return mlir.lower_fun(jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, x, *consts)


def _to_lojax(x, *consts, fn, jaxpr):
    # Newer JAX lowers "high" primitives before compiling; the kernel's jaxpr may hold one
    # (the grouped schedule's searchsorted): rebind with its low-level form.
    return linear_p.bind(x, *consts, fn=fn, jaxpr=lower_jaxpr(jaxpr))


def _jvp(primals, tangents, *, fn, jaxpr):
    x, *consts = primals
    y = linear_p.bind(x, *consts, fn=fn, jaxpr=jaxpr)
    dx, dconsts = tangents[0], tangents[1:]
    dy = None if type(dx) is ad.Zero else linear_p.bind(dx, *consts, fn=fn, jaxpr=jaxpr)
    if fn.apply_dc is not None and any(type(t) is not ad.Zero for t in dconsts):
        dc = fn.apply_dc(x, *consts, *map(ad.instantiate_zeros, dconsts)).astype(y.dtype)
        dy = dc if dy is None else dy + dc
    return y, ad.Zero(jax.typeof(y).to_tangent_aval()) if dy is None else dy


def _transpose(ct, x, *consts, fn, jaxpr):
    if any(ad.is_undefined_primal(c) for c in consts):
        raise NotImplementedError(
            f"{fn.name}: the quantised weight is frozen (no gradient with respect to its "
            "codes or scales); differentiate with respect to x, or dequantise the weight.")
    nothing = [None] * len(consts)
    if type(ct) is ad.Zero:
        return [ad.Zero(x.aval.to_tangent_aval())] + nothing
    dx = linear(ct, consts, fn.T)
    want = aval_explicit_sharding(x.aval)       # Explicit mesh: the cotangent has x's sharding
    if want is not None:
        dx = jax.sharding.reshard(dx, want)
    return [dx] + nothing


@functools.lru_cache(maxsize=None)
def _batched(fn: LinearMap, const_dims: tuple) -> LinearMap:
    # x (and so y and ct) is batched along axis 0; the weight's arrays as they come.
    cax = tuple(None if d is not_mapped else d for d in const_dims)
    axes, dc_axes = (0,) + cax, (0,) + cax + cax     # a const's tangent is batched as it is
    dc = [None if f is None else jax.vmap(f, in_axes=dc_axes)
          for f in (fn.apply_dc, fn.transpose_dc)]
    return LinearMap(jax.vmap(fn.apply, in_axes=axes),
                     jax.vmap(fn.transpose, in_axes=axes), fn.name, *dc)


def _batch(args, dims, *, fn, jaxpr):
    x, *consts = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not not_mapped)
    if dims[0] is not_mapped:     # a batched weight: x broadcast (its cotangent then sums)
        x = jnp.broadcast_to(x, (size,) + x.shape)
    else:
        x = jnp.moveaxis(x, dims[0], 0)
    bfn = _batched(fn, tuple(dims[1:]))
    return linear(x, consts, bfn), 0


linear_p.def_impl(_impl)
linear_p.def_abstract_eval(_abstract_eval)
linear_p.to_lojax = _to_lojax
mlir.register_lowering(linear_p, _lower)
ad.primitive_jvps[linear_p] = _jvp
ad.primitive_transposes[linear_p] = _transpose
batching.primitive_batchers[linear_p] = _batch
