"""Small user-defined Value types for the dispatch-core tests.

`Scaled` is an array stored as `data * scale` (a scalar scale); `SymbolicZero` is an
all-zero array with no array leaves at all, only static shape and dtype. Every rule
appends its name to `LOG` so tests can check which rule ran.

Every rule is mathematically consistent with `materialise()`, so the oracle for any
function `f` is `f(value.materialise())` computed on plain arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import qkern

LOG: list[str] = []


class Scaled(qkern.ArrayValue):
    data: jax.Array
    scale: jax.Array

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.data), jnp.result_type(self.data))

    def materialise(self):
        # A stacked Scaled (as scanned over, or batched) has one scale per leading index.
        scale = jnp.reshape(self.scale, jnp.shape(self.scale)
                            + (1,) * (jnp.ndim(self.data) - jnp.ndim(self.scale)))
        return (self.data * scale).astype(jnp.result_type(self.data))


class SymbolicZero(qkern.ArrayValue):
    shape: tuple = qkern.static_field()
    dtype: Any = qkern.static_field()

    def aval(self):
        return jax.core.ShapedArray(self.shape, self.dtype)

    def materialise(self):
        return jnp.zeros(self.shape, self.dtype)


def make_scaled(shape=(3, 4), scale=2.0, dtype=jnp.float32, seed=0) -> Scaled:
    data = jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
    return Scaled(data, jnp.asarray(scale, jnp.float32))


def dense(x: Any) -> Any:
    """Materialise every Value in a pytree (the oracle's input)."""
    return jax.tree_util.tree_map(
        lambda v: v.materialise() if isinstance(v, qkern.Value) else v, x,
        is_leaf=lambda v: isinstance(v, qkern.Value))


def _sds(x):
    aval = x.aval() if isinstance(x, qkern.Value) else jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


def _zero_like(z, other):
    return SymbolicZero(jnp.broadcast_shapes(z.shape, jnp.shape(other)), z.dtype)


def _cast(x, like):
    return x.astype(jnp.result_type(like))


# -- Scaled rules ----------------------------------------------------------------------
@qkern.register(jax.lax.mul_p)
def _(x: Scaled, y: qkern.ArrayLike, **params):
    LOG.append("mul[Scaled,Array]")
    return Scaled(x.data * y, x.scale)


@qkern.register(jax.lax.mul_p)
def _(x: qkern.ArrayLike, y: Scaled, **params):
    LOG.append("mul[Array,Scaled]")
    return Scaled(x * y.data, y.scale)


@qkern.register(jax.lax.mul_p)
def _(x: Scaled, y: Scaled, **params):
    LOG.append("mul[Scaled,Scaled]")
    return Scaled(x.data * y.data, x.scale * y.scale)


@qkern.register(jax.lax.neg_p)
def _(x: Scaled, **params):
    LOG.append("neg[Scaled]")
    return Scaled(x.data, -x.scale)


@qkern.register(jax.lax.dot_general_p)
def _(x: qkern.ArrayLike, w: Scaled, **params):
    LOG.append("dot[Array,Scaled]")
    out = jax.lax.dot_general_p.bind(x, w.data, **params)
    return _cast(out * w.scale, out)


@qkern.register(jax.lax.dot_general_p)
def _(w: Scaled, x: qkern.ArrayLike, **params):
    LOG.append("dot[Scaled,Array]")
    out = jax.lax.dot_general_p.bind(w.data, x, **params)
    return _cast(out * w.scale, out)


# -- SymbolicZero rules ----------------------------------------------------------------
@qkern.register(jax.lax.mul_p)
def _(x: SymbolicZero, y: qkern.ArrayLike, **params):
    LOG.append("mul[Zero,Array]")
    return _zero_like(x, y)


@qkern.register(jax.lax.mul_p)
def _(x: qkern.ArrayLike, y: SymbolicZero, **params):
    LOG.append("mul[Array,Zero]")
    return _zero_like(y, x)


@qkern.register(jax.lax.add_p)
def _(x: SymbolicZero, y: qkern.ArrayLike, **params):
    LOG.append("add[Zero,Array]")
    return jnp.broadcast_to(y, jnp.broadcast_shapes(x.shape, jnp.shape(y)))


@qkern.register(jax.lax.add_p)
def _(x: qkern.ArrayLike, y: SymbolicZero, **params):
    LOG.append("add[Array,Zero]")
    return jnp.broadcast_to(x, jnp.broadcast_shapes(jnp.shape(x), y.shape))


@qkern.register(jax.lax.dot_general_p)
def _(x: qkern.ArrayLike | SymbolicZero, y: qkern.ArrayLike | SymbolicZero, **params):
    LOG.append("dot[Zero]")
    a, b = _sds(x), _sds(y)
    out = jax.eval_shape(lambda a, b: jax.lax.dot_general_p.bind(a, b, **params), a, b)
    return SymbolicZero(tuple(out.shape), out.dtype)


# -- oracles ---------------------------------------------------------------------------
def field_grads(loss, w: Scaled, *args, argnums=0):
    """Gradient of `loss` w.r.t. (data, scale) of `w`, computed on plain arrays only.

    `loss` is called with the materialised array in place of `w` (at position argnums).
    """
    def plain(d, s):
        a = list(args)
        a.insert(argnums, Scaled(d, s).materialise())
        return loss(*a)
    return jax.grad(plain, argnums=(0, 1))(w.data, w.scale)


def assert_scaled_grad(g, expected, rtol=1e-5, atol=1e-6):
    """`g` is a Scaled whose fields equal `expected` = (d_data, d_scale)."""
    assert type(g) is Scaled, f"gradient came back as {type(g).__name__}, not Scaled"
    np.testing.assert_allclose(np.asarray(g.data, np.float32), np.asarray(expected[0], np.float32),
                               rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(g.scale, np.float32),
                               np.asarray(expected[1], np.float32), rtol=rtol, atol=atol)


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    """Pytrees equal after materialising Values (compared in float32)."""
    got, want = dense(got), dense(want)
    gl, gt = jax.tree_util.tree_flatten(got)
    wl, wt = jax.tree_util.tree_flatten(want)
    assert gt == wt, f"structure {gt} != {wt}"
    for g, w in zip(gl, wl):
        assert np.shape(g) == np.shape(w), (np.shape(g), np.shape(w))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=rtol, atol=atol)
