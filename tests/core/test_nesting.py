"""Nested quaxify and filter_spec: two Value types routed to two levels.

Rules record the trace they run under: a rule of the outer quaxify runs under the outer
quaxify's parent (here: no qkern trace at all); a rule of the inner quaxify runs under its
parent, which is the outer quaxify's trace.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import take_current_trace

import qkern

lax = jax.lax
RECORD: list = []


def _current_trace_kind() -> str:
    with take_current_trace() as t:
        return "qkern" if type(t).__module__.startswith("qkern") else type(t).__name__


class TypeA(qkern.ArrayValue):
    a: jax.Array

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.a), jnp.result_type(self.a))

    def materialise(self):
        return self.a


class TypeB(qkern.ArrayValue):
    b: jax.Array

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.b), jnp.result_type(self.b))

    def materialise(self):
        return self.b


@qkern.register(lax.sin_p)
def _(x: TypeA, **params):
    RECORD.append(("sin", "A", _current_trace_kind()))
    return jnp.sin(x.a) + 100.0


@qkern.register(lax.sin_p)
def _(x: TypeB, **params):
    RECORD.append(("sin", "B", _current_trace_kind()))
    return jnp.sin(x.b) + 1000.0


@qkern.register(lax.mul_p)
def _(x: TypeA, y: qkern.ArrayLike, **params):
    RECORD.append(("mul", "A", _current_trace_kind()))
    return TypeA(x.a * y)


@qkern.register(lax.add_p)
def _(x: TypeB, y: qkern.ArrayLike, **params):
    # `y` may be the outer quaxify's tracer of a TypeA: multiplying it is the outer's job.
    RECORD.append(("add", "B", _current_trace_kind()))
    return lax.mul(y, jnp.float32(2.0)) + x.b


A0 = jnp.array([0.5, 1.0, 2.0], jnp.float32)
B0 = jnp.array([-1.0, 0.0, 3.0], jnp.float32)


@pytest.fixture(autouse=True)
def _clear():
    RECORD.clear()


def _f(a, b):
    ya = lax.sin(a)
    yb = qkern.quaxify(lax.sin)(b)
    return ya, yb


def _check_levels(outer_kind):
    assert ("sin", "A", outer_kind) in RECORD
    assert ("sin", "B", "qkern") in RECORD
    assert ("sin", "A", "qkern") not in RECORD
    assert ("sin", "B", outer_kind) not in RECORD


def test_nested_quaxify_callable_filter_routes_types_to_levels():
    ya, yb = qkern.quaxify(_f, filter_spec=lambda v: isinstance(v, TypeA))(TypeA(A0), TypeB(B0))
    np.testing.assert_allclose(ya, jnp.sin(A0) + 100.0, rtol=1e-6)
    np.testing.assert_allclose(yb, jnp.sin(B0) + 1000.0, rtol=1e-6)
    _check_levels("EvalTrace")


def test_nested_quaxify_prefix_filter_spec():
    spec = (False, (True, False), {})
    ya, yb = qkern.quaxify(_f, filter_spec=spec)(TypeA(A0), TypeB(B0))
    np.testing.assert_allclose(ya, jnp.sin(A0) + 100.0, rtol=1e-6)
    np.testing.assert_allclose(yb, jnp.sin(B0) + 1000.0, rtol=1e-6)
    _check_levels("EvalTrace")


def test_nested_quaxify_under_jit():
    f = jax.jit(qkern.quaxify(_f, filter_spec=(False, (True, False), {})))
    ya, yb = f(TypeA(A0), TypeB(B0))
    np.testing.assert_allclose(ya, jnp.sin(A0) + 100.0, rtol=1e-6)
    np.testing.assert_allclose(yb, jnp.sin(B0) + 1000.0, rtol=1e-6)
    _check_levels("DynamicJaxprTrace")


def test_inner_rule_operating_on_outer_tracer_dispatches_at_outer_level():
    def f(a, b):
        # inner level: add(TypeB, <outer tracer of TypeA>)
        out = qkern.quaxify(lambda b, a: lax.add(b, a))(b, a)
        return out

    out = qkern.quaxify(f, filter_spec=lambda v: isinstance(v, TypeA))(TypeA(A0), TypeB(B0))
    assert ("add", "B", "qkern") in RECORD  # ran under the outer quaxify's trace
    assert ("mul", "A", "EvalTrace") in RECORD  # and its mul of the TypeA went to the outer
    # mul(TypeA, 2) -> TypeA(2a); then + b: no add rule for (TypeA, array): materialised
    np.testing.assert_allclose(out, 2 * A0 + B0, rtol=1e-6)


def test_prefix_filter_spec_for_kwargs():
    seen = []

    def f(x, *, a, b):
        seen.append((type(a).__name__, type(b).__name__))
        return lax.sin(a), qkern.quaxify(lax.sin)(b)

    spec = (False, (False,), {"a": True, "b": False})
    ya, yb = qkern.quaxify(f, filter_spec=spec)(A0, a=TypeA(A0), b=TypeB(B0))
    assert seen[0][1] == "TypeB"  # not selected: arrives as itself
    np.testing.assert_allclose(ya, jnp.sin(A0) + 100.0, rtol=1e-6)
    np.testing.assert_allclose(yb, jnp.sin(B0) + 1000.0, rtol=1e-6)
    _check_levels("EvalTrace")


@pytest.mark.parametrize("spec", [False, (False, (False, False), {}), lambda v: False],
                         ids=["False", "prefix_all_false", "callable_false"])
def test_filter_spec_false_passes_values_through_untouched(spec):
    a, b = TypeA(A0), TypeB(B0)
    seen = []

    def f(a, b):
        seen.append((a, b))
        return a, b

    out = qkern.quaxify(f, filter_spec=spec)(a, b)
    assert seen[0][0] is a and seen[0][1] is b
    assert out[0] is a and out[1] is b
    assert RECORD == []


def test_filter_spec_unselected_value_is_a_plain_pytree_inside():
    a, b = TypeA(A0), TypeB(B0)

    def f(a, b):
        assert type(b) is TypeB  # not a tracer: the trace left it alone
        return lax.sin(a) + b.b

    out = qkern.quaxify(f, filter_spec=(False, (True, False), {}))(a, b)
    np.testing.assert_allclose(out, jnp.sin(A0) + 100.0 + B0, rtol=1e-6)


def test_filter_spec_not_matching_the_call_is_an_error():
    with pytest.raises(ValueError, match="filter_spec"):
        qkern.quaxify(lambda a: a, filter_spec=(False, (True, True, True), {}))(TypeA(A0))
