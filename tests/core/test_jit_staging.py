"""jax.jit inside quaxify stays a jit: traced once per signature, and visible as a `jit`
equation in the outer jaxpr rather than inlined.
"""

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from tests.core.qtypes import Scaled, SymbolicZero, assert_close, make_scaled

lax = jax.lax


def _x(shape=(2, 3), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_inner_jit_traced_once_for_two_calls(log):
    calls = []

    def inner(x, w):
        calls.append(1)
        return lax.dot(x, w)

    ji = jax.jit(inner)
    h = qkern.quaxify(lambda x, w: ji(x, w) + ji(x, w))
    w, x = make_scaled(), _x()
    want = 2 * (x @ w.materialise())
    assert_close(h(x, w), want)
    assert len(calls) == 1
    assert log.count("dot[Array,Scaled]") == 1  # the rule ran when the jit was traced, once
    # Again, with new values of the same signature, and under an outer jit.
    w2 = Scaled(w.data + 1, jnp.asarray(0.3, jnp.float32))
    assert_close(h(x, w2), 2 * (x @ w2.materialise()))
    assert_close(jax.jit(h)(x, w), want)
    assert len(calls) == 1
    assert log.count("dot[Array,Scaled]") == 1


def test_inner_jit_retraced_for_a_new_signature(log):
    calls = []

    def inner(x, z):
        calls.append(1)
        return lax.dot(x, z)

    ji = jax.jit(inner)
    q = qkern.quaxify(lambda x, z: ji(x, z))
    x = _x()
    for cols in (4, 5, 4):
        out = q(x, SymbolicZero((3, cols), jnp.dtype(jnp.float32)))
        assert type(out) is SymbolicZero and out.shape == (2, cols)
    assert len(calls) == 2  # avals (3, 4) and (3, 5)
    # Same avals, another Value type: the user function need not be traced again (its jaxpr
    # only sees avals), but that type's rules must run, not SymbolicZero's.
    w = make_scaled((3, 4))
    assert_close(q(x, w), x @ w.materialise())
    assert "dot[Array,Scaled]" in log


def test_inner_jit_returning_a_value_keeps_its_type():
    calls = []

    def inner(w):
        calls.append(1)
        return lax.neg(lax.mul(w, jnp.float32(2.0)))

    ji = jax.jit(inner)
    w = make_scaled()
    out = qkern.quaxify(lambda w: ji(ji(w)))(w)
    assert type(out) is Scaled
    np.testing.assert_allclose(out.data, 4 * w.data, rtol=1e-6)
    np.testing.assert_allclose(out.scale, w.scale, rtol=1e-6)
    assert len(calls) == 1


def test_make_jaxpr_shows_jit_equation_not_inlined():
    def inner_matmul(x, w):
        return jnp.tanh(lax.dot(x, w))

    w, x = make_scaled(), _x()
    f = qkern.quaxify(lambda x, w: jax.jit(inner_matmul)(x, w) * 2.0)
    closed = jax.make_jaxpr(f)(x, w)
    names = [e.primitive.name for e in closed.jaxpr.eqns]
    assert "jit" in names, closed
    assert "dot_general" not in names and "tanh" not in names, closed
    (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "jit"]
    inner_text = str(eqn.params["jaxpr"])
    # The Scaled rule ran inside the jit: dot_general on the (3, 4) data, then the scale.
    assert "dot_general" in inner_text and "tanh" in inner_text
    # The jit takes the Value's leaves (data and scale), not a materialised array.
    assert [tuple(v.aval.shape) for v in eqn.invars][-2:] == [(3, 4), ()]
    assert_close(f(x, w), 2 * jnp.tanh(x @ w.materialise()))


def test_register_after_jitted_call_takes_effect():
    # Bug: `register` clears the resolution cache, but not the cache of jitted leaf
    # functions that a jit inside quaxify uses; jnp functions are jitted, so a rule
    # registered after the first call of e.g. jnp.sin on that type was never used.
    class Late(qkern.ArrayValue):
        a: jax.Array

        def aval(self):
            return jax.core.ShapedArray(jnp.shape(self.a), jnp.result_type(self.a))

        def materialise(self):
            return self.a

    v = Late(jnp.array([0.5, 1.0, 2.0]))
    f = qkern.quaxify(lambda v: jnp.sin(v))
    np.testing.assert_allclose(f(v), jnp.sin(v.a), rtol=1e-6)  # default: materialise

    @qkern.register(jax.lax.sin_p)
    def _(x: Late, **params):
        return jnp.cos(x.a)

    np.testing.assert_allclose(qkern.quaxify(jax.lax.sin)(v), jnp.cos(v.a), rtol=1e-6)
    np.testing.assert_allclose(f(v), jnp.cos(v.a), rtol=1e-6)
