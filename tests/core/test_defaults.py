"""`Value.default`'s four rules, and what happens when a Value's materialise() misbehaves."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from tests.core.qtypes import Scaled, assert_close, make_scaled

X = jnp.array([0.5, -1.0, 2.0], jnp.float32)


def overriding_type(name: str, offset: float, calls: list):
    """A fresh Value type whose `default` binds on materialised operands and adds `offset`."""

    class T(qkern.ArrayValue):
        a: jax.Array

        def aval(self):
            return jax.core.ShapedArray(jnp.shape(self.a), jnp.result_type(self.a))

        def materialise(self):
            return self.a

        @staticmethod
        def default(primitive, values, params):
            calls.append((name, primitive.name, tuple(type(v).__name__ for v in values)))
            arrays = [v.materialise() if isinstance(v, qkern.Value) else v for v in values]
            return primitive.bind(*arrays, **params) + offset

    T.__name__ = T.__qualname__ = name
    return T


def plain_type(name: str):
    class T(qkern.ArrayValue):
        a: jax.Array

        def aval(self):
            return jax.core.ShapedArray(jnp.shape(self.a), jnp.result_type(self.a))

        def materialise(self):
            return self.a

    T.__name__ = T.__qualname__ = name
    return T


# -- (a) a registered rule wins --------------------------------------------------------
def test_default_registered_rule_wins_over_overridden_default():
    calls = []
    Loud = overriding_type("Loud", 1000.0, calls)

    @qkern.register(jax.lax.sin_p)
    def _(x: Loud, **params):
        return jnp.cos(x.a)

    out = qkern.quaxify(jax.lax.sin)(Loud(X))
    np.testing.assert_allclose(out, jnp.cos(X), rtol=1e-6)
    assert calls == []
    # A primitive with no rule still goes to the override.
    out = qkern.quaxify(jax.lax.exp)(Loud(X))
    np.testing.assert_allclose(out, jnp.exp(X) + 1000.0, rtol=1e-6)
    assert calls == [("Loud", "exp", ("Loud",))]


# -- (b) exactly one overriding type: its default runs ---------------------------------
def test_default_single_override_runs():
    calls = []
    Loud = overriding_type("Loud", 1000.0, calls)
    out = qkern.quaxify(jax.lax.sin)(Loud(X))
    np.testing.assert_allclose(out, jnp.sin(X) + 1000.0, rtol=1e-6)
    assert calls == [("Loud", "sin", ("Loud",))]


def test_default_single_override_runs_next_to_non_overriding_value():
    calls = []
    Loud = overriding_type("Loud", 1000.0, calls)
    Quiet = plain_type("Quiet")
    y = jnp.array([1.0, 2.0, 3.0])
    out = qkern.quaxify(jax.lax.sub)(Quiet(y), Loud(X))
    np.testing.assert_allclose(out, y - X + 1000.0, rtol=1e-6)
    # The default received the Values themselves, not materialised arrays.
    assert calls == [("Loud", "sub", ("Quiet", "Loud"))]


def test_default_same_overriding_type_twice_is_not_a_conflict():
    calls = []
    Loud = overriding_type("Loud", 1000.0, calls)
    out = qkern.quaxify(jax.lax.mul)(Loud(X), Loud(2 * X))
    np.testing.assert_allclose(out, 2 * X * X + 1000.0, rtol=1e-6)
    assert len(calls) == 1


# -- (c) no overrides: materialise everything and bind ---------------------------------
@pytest.mark.parametrize("fn", [
    jnp.sin,
    lambda w: jnp.cumsum(w, axis=1),
    lambda w: jnp.sort(w, axis=0),
    lambda w: jax.lax.dot_general(w, w, (((1,), (1,)), ((), ()))),  # no (Scaled, Scaled) rule
    lambda w: jnp.max(w, axis=0),
    lambda w: jax.lax.rsqrt(w * w + 1.0),
], ids=["sin", "cumsum", "sort", "dot_scaled_scaled", "max", "rsqrt"])
def test_default_no_override_materialises_and_binds(fn):
    w = make_scaled((3, 4), scale=0.7)
    out = qkern.quaxify(fn)(w)
    assert isinstance(out, jax.Array) and not isinstance(out, qkern.Value)
    assert_close(out, fn(w.materialise()))


def test_default_no_override_two_different_plain_types():
    A, B = plain_type("PlainA"), plain_type("PlainB")
    y = jnp.array([4.0, 5.0, 6.0])
    out = qkern.quaxify(jax.lax.atan2)(A(X), B(y))
    np.testing.assert_allclose(out, jax.lax.atan2(X, y), rtol=1e-6)


# -- (d) two different overriding types: TypeError at trace time ----------------------
def test_default_two_overriding_types_raise_naming_both():
    calls = []
    Left = overriding_type("LeftOverride", 1.0, calls)
    Right = overriding_type("RightOverride", 2.0, calls)
    f = qkern.quaxify(jax.lax.add)
    with pytest.raises(TypeError) as info:
        jax.make_jaxpr(f)(Left(X), Right(X))  # tracing only: nothing is executed
    msg = str(info.value)
    assert "LeftOverride" in msg and "RightOverride" in msg
    assert calls == []
    with pytest.raises(TypeError, match="LeftOverride.*RightOverride|RightOverride.*LeftOverride"):
        f(Left(X), Right(X))


def test_default_two_overriding_types_resolved_by_a_rule():
    calls = []
    Left = overriding_type("LeftOverride", 1.0, calls)
    Right = overriding_type("RightOverride", 2.0, calls)

    @qkern.register(jax.lax.add_p)
    def _(x: Left, y: Right, **params):
        return x.a * y.a

    out = qkern.quaxify(jax.lax.add)(Left(X), Right(X))
    np.testing.assert_allclose(out, X * X, rtol=1e-6)
    assert calls == []


# -- aval() / materialise() disagreements ----------------------------------------------
class WrongShape(qkern.ArrayValue):
    a: jax.Array

    def aval(self):
        return jax.core.ShapedArray((5, 7), jnp.float32)

    def materialise(self):
        return self.a  # (2, 3)


class WrongDtype(qkern.ArrayValue):
    a: jax.Array

    def aval(self):
        return jax.core.ShapedArray((2, 3), jnp.float16)

    def materialise(self):
        return self.a  # float32


def _shape_in(msg, shape):
    dims = r",?\s*".join(str(d) for d in shape)
    return re.search(r"[\[(]\s*" + dims + r",?\s*[\])]", msg) is not None


MISMATCH_PATHS = {
    "eager": lambda f: qkern.quaxify(f),
    "jit_outside": lambda f: jax.jit(qkern.quaxify(f)),
    "jit_inside": lambda f: qkern.quaxify(jax.jit(f)),
    "make_jaxpr": lambda f: (lambda v: jax.make_jaxpr(qkern.quaxify(f))(v)),
}


@pytest.mark.parametrize("path", sorted(MISMATCH_PATHS))
def test_aval_shape_disagreeing_with_materialise_is_a_type_error(path):
    v = WrongShape(jnp.ones((2, 3), jnp.float32))
    with pytest.raises(TypeError) as info:
        MISMATCH_PATHS[path](jnp.tanh)(v)
    msg = str(info.value)
    assert _shape_in(msg, (5, 7)), msg
    assert _shape_in(msg, (2, 3)), msg
    assert "WrongShape" in msg


@pytest.mark.parametrize("path", sorted(MISMATCH_PATHS))
def test_aval_dtype_disagreeing_with_materialise_is_a_type_error(path):
    v = WrongDtype(jnp.ones((2, 3), jnp.float32))
    with pytest.raises(TypeError) as info:
        MISMATCH_PATHS[path](jnp.tanh)(v)
    msg = str(info.value)
    assert "float16" in msg and "float32" in msg, msg


def test_aval_mismatch_in_higher_order_paths():
    v = WrongShape(jnp.ones((2, 3), jnp.float32))
    fns = [
        lambda v: jax.lax.cond(True, jnp.sin, jnp.cos, v),
        lambda v: jax.nn.relu(v),
        lambda v: jax.checkpoint(jnp.sin)(v),
        lambda v: jax.lax.fori_loop(0, 2, lambda i, c: c + jnp.sum(v), 0.0),
    ]
    for fn in fns:
        with pytest.raises(TypeError) as info:
            qkern.quaxify(fn)(v)
        assert _shape_in(str(info.value), (5, 7)) and _shape_in(str(info.value), (2, 3))


# -- errors raised by materialise() surface unchanged ----------------------------------
class MaterialiseFailed(Exception):
    pass


RAISED: list = []


class Exploding(qkern.ArrayValue):
    a: jax.Array

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.a), jnp.result_type(self.a))

    def materialise(self):
        err = MaterialiseFailed("cannot materialise Exploding: code 42")
        RAISED.append(err)
        raise err


@pytest.mark.parametrize("fn", [
    jnp.sin,
    jax.jit(jnp.sin),
    lambda v: jax.lax.cond(True, jnp.sin, jnp.cos, v),
    jax.nn.relu,
    lambda v: jax.lax.scan(lambda c, _: (c + jnp.sum(v), None), 0.0, None, length=2)[0],
], ids=["eager", "inner_jit", "cond", "custom_jvp", "scan"])
def test_materialise_exception_surfaces_unchanged(fn):
    RAISED.clear()
    with pytest.raises(MaterialiseFailed) as info:
        qkern.quaxify(fn)(Exploding(X))
    assert type(info.value) is MaterialiseFailed
    assert str(info.value) == "cannot materialise Exploding: code 42"
    assert info.value is RAISED[-1]


def test_materialise_exception_surfaces_unchanged_under_outer_jit_and_grad():
    for wrap in (jax.jit, lambda f: jax.grad(lambda v: jnp.sum(f(v)))):
        # (JAX may attach a traceback-filtering __notes__ entry; the exception is the same.)
        with pytest.raises(MaterialiseFailed) as info:
            wrap(qkern.quaxify(jnp.sin))(Exploding(X))
        assert type(info.value) is MaterialiseFailed
        assert info.value.args == ("cannot materialise Exploding: code 42",)
