"""Pass-through: plain arrays are untouched by quaxify, bit for bit, whether or not a Value
is present elsewhere in the call; and a call with no Value costs nothing (the function is
called directly with the very same objects).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.extend.core import take_current_trace

import qkern
from tests.core.qtypes import make_scaled

lax = jax.lax
rng = np.random.default_rng(0)


def arr(*shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape).astype(dtype))


A34, B45, V12 = arr(3, 4), arr(4, 5), arr(12)
IMG, KER = arr(1, 2, 6, 6), arr(3, 2, 3, 3)
IDX = jnp.array([2, 0, 1], jnp.int32)

CASES = {
    "matmul": (jnp.matmul, (A34, B45)),
    "einsum": (lambda a, b: jnp.einsum("ij,jk->ik", a, b), (A34, B45)),
    "dot_general": (lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ()))), (A34, B45)),
    "sum": (lambda a: jnp.sum(a, axis=1), (A34,)),
    "mean": (jnp.mean, (A34,)),
    "max": (lambda a: jnp.max(a, axis=0), (A34,)),
    "exp": (jnp.exp, (A34,)),
    "log": (lambda a: jnp.log(jnp.abs(a) + 1.0), (A34,)),
    "tanh": (jnp.tanh, (A34,)),
    "where": (lambda a: jnp.where(a > 0, a, -2.0 * a), (A34,)),
    "concatenate": (lambda a: jnp.concatenate([a, a * 2], axis=0), (A34,)),
    "reshape": (lambda a: jnp.reshape(a, (2, 6)), (A34,)),
    "transpose": (jnp.transpose, (A34,)),
    "take": (lambda a, i: jnp.take(a, i, axis=0), (A34, IDX)),
    "argsort": (lambda v: jnp.argsort(v), (V12,)),
    "sort": (jnp.sort, (V12,)),
    "cumsum": (lambda a: jnp.cumsum(a, axis=1), (A34,)),
    "softmax": (lambda a: jax.nn.softmax(a, axis=-1), (A34,)),
    "log_softmax": (jax.nn.log_softmax, (A34,)),
    "gelu": (jax.nn.gelu, (A34,)),
    "relu": (jax.nn.relu, (A34,)),
    "conv_general_dilated": (lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), "SAME", rhs_dilation=(2, 1)), (IMG, KER)),
    "dynamic_slice": (lambda a: lax.dynamic_slice(a, (1, 2), (2, 2)), (A34,)),
    "dynamic_update_slice": (lambda a: lax.dynamic_update_slice(a, jnp.ones((2, 2)), (1, 1)),
                             (A34,)),
    "gather_index": (lambda a, i: a[i, 1:3], (A34, IDX)),
    "scatter_add": (lambda a, i: a.at[i].add(1.0), (A34, IDX)),
    "linalg_norm": (jnp.linalg.norm, (A34,)),
    "top_k": (lambda v: lax.top_k(v, 3), (V12,)),
    "argmax": (lambda a: jnp.argmax(a, axis=1), (A34,)),
    "clip": (lambda a: jnp.clip(a, -0.5, 0.5), (A34,)),
    "astype_bf16": (lambda a: a.astype(jnp.bfloat16) * 3, (A34,)),
    "cond": (lambda a: lax.cond(jnp.sum(a) > 0, jnp.sin, jnp.cos, a), (A34,)),
    "scan": (lambda v: lax.scan(lambda c, x: (c + x, c * x), 0.0, v), (V12,)),
    "fori_loop": (lambda a: lax.fori_loop(0, 3, lambda i, c: c @ c.T @ c * 0.1, a), (A34,)),
    "grad": (jax.grad(lambda a: jnp.sum(jnp.sin(a) ** 2)), (A34,)),
    "vmap": (jax.vmap(lambda r: jnp.outer(r, r)), (A34,)),
    "jit": (jax.jit(lambda a, b: jnp.tanh(a @ b)), (A34, B45)),
    "random": (lambda k: jax.random.normal(k, (3,)), (jax.random.key(0),)),
}


def assert_identical(got, want):
    gl, gt = jax.tree_util.tree_flatten(got)
    wl, wt = jax.tree_util.tree_flatten(want)
    assert gt == wt
    for g, w in zip(gl, wl):
        assert type(g) is type(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert jax.typeof(g).weak_type == jax.typeof(w).weak_type
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("name", sorted(CASES))
def test_passthrough_plain_arrays_only(name):
    fn, args = CASES[name]
    assert_identical(qkern.quaxify(fn)(*args), fn(*args))


@pytest.mark.parametrize("name", sorted(CASES))
def test_passthrough_with_a_value_present(name):
    fn, args = CASES[name]
    w = make_scaled()
    out, w_out = qkern.quaxify(lambda w, *a: (fn(*a), w))(w, *args)
    assert_identical(out, fn(*args))
    assert type(w_out) is type(w)
    np.testing.assert_array_equal(w_out.data, w.data)


def test_passthrough_with_a_value_present_under_jit():
    fn, args = CASES["conv_general_dilated"]
    w = make_scaled()
    out, _ = jax.jit(qkern.quaxify(lambda w, *a: (fn(*a), w)))(w, *args)
    assert_identical(out, jax.jit(fn)(*args))


# -- property tests over shapes -------------------------------------------------------------
ELEMENTWISE = [jnp.sin, jnp.exp, jnp.tanh, jax.nn.relu, jax.nn.gelu, lambda a: a * 2.5 - 1.0]
REDUCTIONS = [jnp.sum, jnp.mean, jnp.max, lambda a: jnp.cumsum(a, axis=-1),
              lambda a: jax.nn.softmax(a, axis=-1), lambda a: jnp.argsort(a, axis=-1)]
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@settings(max_examples=12, deadline=None)
@given(shape=shapes, k=st.integers(0, len(ELEMENTWISE) + len(REDUCTIONS) - 1),
       seed=st.integers(0, 2**16))
def test_passthrough_property_unary(shape, k, seed):
    fn = (ELEMENTWISE + REDUCTIONS)[k]
    a = jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    w = make_scaled()
    assert_identical(qkern.quaxify(fn)(a), fn(a))
    assert_identical(qkern.quaxify(lambda w, a: fn(a))(w, a), fn(a))


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 6), batch=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_passthrough_property_matmul(m, k, n, batch, seed):
    r = np.random.default_rng(seed)
    lead = (2,) * batch
    a = jnp.asarray(r.standard_normal(lead + (m, k)).astype(np.float32))
    b = jnp.asarray(r.standard_normal((k, n)).astype(np.float32))
    fn = lambda a, b: jnp.matmul(a, b)
    assert_identical(qkern.quaxify(fn)(a, b), fn(a, b))
    assert_identical(qkern.quaxify(lambda w, a, b: fn(a, b))(make_scaled(), a, b), fn(a, b))


# -- zero overhead --------------------------------------------------------------------------
def _trace_module() -> str:
    with take_current_trace() as t:
        return type(t).__module__


def test_no_value_calls_function_directly_with_same_objects():
    a, b = jnp.ones(3), np.zeros(3)
    seen, traces = [], []

    def f(x, y, *, z):
        seen.append((x, y, z))
        traces.append(_trace_module())
        return x

    out = qkern.quaxify(f)(a, b, z=a)
    assert seen[0][0] is a and seen[0][1] is b and seen[0][2] is a
    assert not isinstance(seen[0][0], jax.core.Tracer)
    assert out is a
    assert not traces[0].startswith("qkern")  # no dispatch trace was set up at all


def test_no_selected_value_calls_function_directly():
    a = jnp.ones(3)
    w = make_scaled()
    seen = []

    def f(x, w):
        seen.append((x, w, _trace_module()))
        return x

    out = qkern.quaxify(f, filter_spec=False)(a, w)
    assert seen[0][0] is a and seen[0][1] is w and out is a
    assert not seen[0][2].startswith("qkern")


def test_no_value_under_outer_transform_sees_outer_tracers_only():
    seen = []

    def f(x):
        seen.append(type(x))  # the type only: keeping the tracer would leak it
        return jnp.sin(x)

    jax.jit(qkern.quaxify(f))(jnp.ones(3))
    assert issubclass(seen[0], jax.core.Tracer)
    assert seen[0].__module__.startswith("jax")  # a jit tracer, not a qkern tracer
