"""A user-defined Value (tests/core/qtypes.py) through jit, grad, vmap and jvp, in every
order, in float32 and bfloat16.

The oracle is always the same computation on the materialised plain array; gradients with
respect to a Value are checked field by field against hand-derived formulas or against the
gradient, on plain arrays, of `f(Scaled(data, scale).materialise())`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qkern
from tests.core.qtypes import (Scaled, SymbolicZero, assert_close, assert_scaled_grad, dense,
                               field_grads, make_scaled)

DTYPES = [jnp.float32, jnp.bfloat16]
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _x(shape=(2, 3), dtype=jnp.float32, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def layer(x, w):
    # lax-level ops, not jnp: jnp functions are jitted, and a jit inside quaxify is traced
    # once per signature for the whole process, so rules inside them would not log again.
    return jnp.tanh(jax.lax.dot(x, jax.lax.mul(w, jnp.asarray(0.5, w.dtype))))


def loss(w, x):
    return jnp.sum(layer(x, w) ** 2)


# -- plain call and jit --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_quaxify_matches_plain_and_uses_rules(dtype, log):
    w, x = make_scaled((3, 4), 0.5, dtype), _x(dtype=dtype)
    out = qkern.quaxify(layer)(x, w)
    assert out.dtype == dtype
    assert_close(out, layer(x, w.materialise()), **TOL[dtype])
    assert log == ["mul[Scaled,Array]", "dot[Array,Scaled]"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_jit_outside_quaxify(dtype, log):
    w, x = make_scaled((3, 4), 0.5, dtype), _x(dtype=dtype)
    f = jax.jit(qkern.quaxify(layer))
    out = f(x, w)
    assert out.dtype == dtype
    assert_close(out, layer(x, w.materialise()), **TOL[dtype])
    assert "dot[Array,Scaled]" in log
    # A second call with new values but the same structure reuses the compiled function.
    n = len(log)
    w2 = Scaled(w.data * 2, jnp.asarray(0.25, jnp.float32))
    assert_close(f(x, w2), layer(x, w2.materialise()), **TOL[dtype])
    assert len(log) == n


def test_jit_outside_quaxify_returns_value():
    w = make_scaled((3, 4), 0.5)
    out = jax.jit(qkern.quaxify(lambda w: -(w * 3.0)))(w)
    assert type(out) is Scaled
    np.testing.assert_allclose(out.data, w.data * 3.0, rtol=1e-6)
    np.testing.assert_allclose(out.scale, -w.scale, rtol=1e-6)


def test_quaxify_of_jit(log):
    w, x = make_scaled((3, 4), 0.5), _x()
    out = qkern.quaxify(jax.jit(layer))(x, w)
    assert_close(out, layer(x, w.materialise()))
    assert "dot[Array,Scaled]" in log


def test_symbolic_zero_through_jit():
    z = SymbolicZero((3, 4), jnp.dtype(jnp.float32))
    x = _x()
    out = jax.jit(qkern.quaxify(lambda x, z: x @ z))(x, z)
    assert type(out) is SymbolicZero
    assert (out.shape, out.dtype) == ((2, 4), jnp.dtype(jnp.float32))
    out = jax.jit(qkern.quaxify(lambda x, z: x @ z + 1.0))(x, z)
    np.testing.assert_array_equal(out, np.ones((2, 4), np.float32))


# -- grad -------------------------------------------------------------------------------
def test_grad_wrt_value_fields_hand_derived():
    # L = sum(x @ (w * 3)) with w = d * s  =>  dL/dd = 3 s (x^T 1),  dL/ds = 3 sum(d * (x^T 1))
    w, x = make_scaled((3, 4), 0.5), _x()
    g = jax.grad(qkern.quaxify(lambda w: jnp.sum(x @ (w * 3.0))))(w)
    colsum = (x.T @ jnp.ones((2, 4)))
    assert_scaled_grad(g, (3 * w.scale * colsum, 3 * jnp.sum(w.data * colsum)), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_grad_wrt_value(dtype):
    w, x = make_scaled((3, 4), 0.5, dtype), _x(dtype=dtype)
    f = lambda w, x: loss(w, x).astype(jnp.float32)
    g = jax.grad(qkern.quaxify(f))(w, x)
    assert g.data.dtype == dtype and g.scale.dtype == jnp.float32
    assert_scaled_grad(g, field_grads(f, w, x), **TOL[dtype])


def test_value_and_grad_wrt_value_and_plain():
    w, x = make_scaled((3, 4), 0.5), _x()
    (val, (gw, gx)) = jax.value_and_grad(qkern.quaxify(loss), argnums=(0, 1))(w, x)
    np.testing.assert_allclose(val, loss(w.materialise(), x), rtol=1e-5)
    assert_scaled_grad(gw, field_grads(loss, w, x))
    np.testing.assert_allclose(gx, jax.grad(loss, argnums=1)(w.materialise(), x), rtol=1e-5)


def test_grad_of_jit_and_jit_of_grad():
    w, x = make_scaled((3, 4), 0.5), _x()
    want = field_grads(loss, w, x)
    assert_scaled_grad(jax.grad(jax.jit(qkern.quaxify(loss)))(w, x), want)
    assert_scaled_grad(jax.jit(jax.grad(qkern.quaxify(loss)))(w, x), want)
    assert_scaled_grad(jax.grad(qkern.quaxify(jax.jit(loss)))(w, x), want)


def test_grad_wrt_value_unused_is_zero():
    w = make_scaled((3, 4), 0.5)
    g = jax.grad(qkern.quaxify(lambda w, x: jnp.sum(x ** 2)))(w, _x())
    assert_scaled_grad(g, (jnp.zeros((3, 4)), 0.0))


def test_quaxify_of_grad_wrt_plain_array(log):
    # grad inside quaxify, w.r.t. a plain array, while a Value takes part.
    w, x = make_scaled((3, 4), 0.5), _x()
    plain = lambda x, w: jnp.sum(jnp.sin(x @ w))
    g = qkern.quaxify(jax.grad(plain))(x, w)
    np.testing.assert_allclose(g, jax.grad(plain)(x, w.materialise()), rtol=1e-5, atol=1e-6)
    assert "dot[Array,Scaled]" in log
    v, g = qkern.quaxify(jax.value_and_grad(plain))(x, w)
    np.testing.assert_allclose(v, plain(x, w.materialise()), rtol=1e-5)
    np.testing.assert_allclose(g, jax.grad(plain)(x, w.materialise()), rtol=1e-5, atol=1e-6)


def test_quaxify_of_grad_wrt_value_gives_dense_gradient():
    w, x = make_scaled((3, 4), 0.5), _x()
    plain = lambda w: jnp.sum(jnp.sin(x @ w))
    g = qkern.quaxify(jax.grad(plain))(w)
    np.testing.assert_allclose(dense(g), jax.grad(plain)(w.materialise()), rtol=1e-5, atol=1e-6)


# -- vmap -------------------------------------------------------------------------------
def _stacked(n=5):
    data = jax.random.normal(jax.random.key(7), (n, 3, 4))
    return Scaled(data, jnp.linspace(0.5, 1.5, n))


def test_vmap_over_value_batches_its_leaves(log):
    ws, x = _stacked(), _x()
    out = jax.vmap(qkern.quaxify(layer), in_axes=(None, 0))(x, ws)
    want = jax.vmap(layer, in_axes=(None, 0))(x, ws.materialise())
    assert out.shape == (5, 2, 4)
    assert_close(out, want)
    assert "dot[Array,Scaled]" in log


def test_vmap_over_value_with_leafwise_in_axes():
    # Batch only `data`; `scale` is shared.
    data = jax.random.normal(jax.random.key(7), (5, 3, 4))
    w = Scaled(data, jnp.asarray(0.75))
    x = _x()
    out = jax.vmap(qkern.quaxify(layer), in_axes=(None, Scaled(0, None)))(x, w)
    want = jax.vmap(lambda d: layer(x, d * 0.75))(data)
    assert_close(out, want)


def test_vmap_value_output():
    ws = _stacked()
    out = jax.vmap(qkern.quaxify(lambda w: w * 2.0))(ws)
    assert type(out) is Scaled and out.data.shape == (5, 3, 4) and out.scale.shape == (5,)
    assert_close(out.materialise(), ws.materialise() * 2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_vmap_over_plain_with_value_unbatched(dtype, log):
    w, xs = make_scaled((3, 4), 0.5, dtype), _x((6, 2, 3), dtype)
    want = jax.vmap(layer, in_axes=(0, None))(xs, w.materialise())
    out = jax.vmap(qkern.quaxify(layer), in_axes=(0, None))(xs, w)
    assert_close(out, want, **TOL[dtype])
    out = qkern.quaxify(jax.vmap(layer, in_axes=(0, None)))(xs, w)
    assert_close(out, want, **TOL[dtype])
    assert log.count("dot[Array,Scaled]") == 2


def test_vmap_of_grad_over_value():
    ws, x = _stacked(3), _x()
    g = jax.vmap(jax.grad(qkern.quaxify(loss)), in_axes=(0, None))(ws, x)
    assert type(g) is Scaled
    for i in range(3):
        wi = Scaled(ws.data[i], ws.scale[i])
        assert_scaled_grad(Scaled(g.data[i], g.scale[i]), field_grads(loss, wi, x))


def test_jit_vmap_grad_stack():
    ws, x = _stacked(3), _x()
    g = jax.jit(jax.vmap(jax.grad(qkern.quaxify(loss)), in_axes=(0, None)))(ws, x)
    wi = Scaled(ws.data[1], ws.scale[1])
    assert_scaled_grad(Scaled(g.data[1], g.scale[1]), field_grads(loss, wi, x))


# -- jvp --------------------------------------------------------------------------------
def test_jvp_wrt_value():
    w, x = make_scaled((3, 4), 0.5), _x()
    tw = Scaled(jnp.ones((3, 4)), jnp.asarray(0.3))
    p, t = jax.jvp(qkern.quaxify(layer), (x, w), (jnp.zeros_like(x), tw))
    p2, t2 = jax.jvp(lambda d, s: layer(x, Scaled(d, s).materialise()),
                     (w.data, w.scale), (tw.data, tw.scale))
    assert_close(p, p2)
    assert_close(t, t2)


def test_jvp_wrt_plain_with_value_constant():
    w, x = make_scaled((3, 4), 0.5), _x()
    tx = jnp.ones_like(x)
    p, t = jax.jvp(lambda x: qkern.quaxify(layer)(x, w), (x,), (tx,))
    p2, t2 = jax.jvp(lambda x: layer(x, w.materialise()), (x,), (tx,))
    assert_close((p, t), (p2, t2))


# -- methods and kwargs -------------------------------------------------------------------
def test_quaxify_with_keyword_value_and_method():
    w, x = make_scaled((3, 4), 0.5), _x()
    out = qkern.quaxify(lambda x, *, w: x @ w)(x, w=w)
    assert_close(out, x @ w.materialise())

    class Model:
        @qkern.quaxify
        def __call__(self, x, w):
            return x @ w

    assert_close(Model()(x, w), x @ w.materialise())


# -- a small model with Values in a parameter pytree ----------------------------------------
def _mlp_params():
    return {"l1": {"w": make_scaled((3, 8), 0.5, seed=1), "b": jnp.zeros(8)},
            "l2": {"w": make_scaled((8, 2), 0.3, seed=2), "b": jnp.ones(2)}}


def _mlp(p, x):
    h = jax.nn.gelu(x @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["l2"]["w"] + p["l2"]["b"]


def test_model_with_value_params_forward_grad_vmap():
    params, x = _mlp_params(), _x((5, 3))
    assert_close(qkern.quaxify(_mlp)(params, x), _mlp(dense(params), x))
    loss = lambda p, x: jnp.mean((_mlp(p, x) - 1.0) ** 2)
    g = jax.jit(jax.grad(qkern.quaxify(loss)))(params, x)
    assert type(g["l1"]["w"]) is Scaled and type(g["l2"]["w"]) is Scaled
    for layer_name in ("l1", "l2"):
        w = params[layer_name]["w"]

        def plain(d, s, layer_name=layer_name):
            p = dense(params)
            p[layer_name] = dict(p[layer_name], w=Scaled(d, s).materialise())
            return loss(p, x)

        want = jax.jit(jax.grad(plain, argnums=(0, 1)))(w.data, w.scale)
        assert_scaled_grad(g[layer_name]["w"], want, rtol=1e-4)
    dense_w2 = dense(params["l2"]["w"])
    gb = jax.jit(jax.grad(lambda b: loss(dict(dense(params), l2={"w": dense_w2, "b": b}), x)))(
        params["l2"]["b"])
    np.testing.assert_allclose(g["l2"]["b"], gb, rtol=1e-4, atol=1e-6)
    out = jax.vmap(qkern.quaxify(_mlp), in_axes=(None, 0))(params, x[:, None, :])
    assert_close(out[:, 0, :], _mlp(dense(params), x))


def test_eval_shape_and_has_aux():
    w = make_scaled((3, 8), 0.5)
    out = jax.eval_shape(qkern.quaxify(lambda w: jax.lax.mul(w, 2.0)), w)
    assert type(out) is Scaled and out.data.shape == (3, 8) and out.scale.shape == ()
    g, aux = jax.grad(qkern.quaxify(lambda w: (jnp.sum(jnp.sin(w)), jax.lax.mul(w, 3.0))),
                      has_aux=True)(w)
    assert type(aux) is Scaled
    np.testing.assert_allclose(aux.data, 3 * w.data, rtol=1e-6)
    assert_scaled_grad(g, field_grads(lambda m: jnp.sum(jnp.sin(m)), w))


@settings(max_examples=5, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 5), n=st.integers(1, 5),
       scale=st.floats(-2.0, 2.0, allow_nan=False, width=32), right=st.booleans())
def test_property_dot_with_value_matches_dense_and_grad(m, k, n, scale, right):
    w = make_scaled((k, n) if right else (m, k), scale)
    x = _x((m, k) if right else (k, n), seed=m * 31 + n)
    f = (lambda x, w: jax.lax.dot(x, w)) if right else (lambda x, w: jax.lax.dot(w, x))
    # jitted on both sides: one compilation per drawn shape instead of one per operation
    assert_close(jax.jit(qkern.quaxify(f))(x, w), f(x, w.materialise()), rtol=1e-5, atol=1e-5)
    loss = lambda w, x: jnp.sum(jnp.sin(f(x, w)))
    want = jax.jit(lambda w, x: field_grads(loss, w, x))(w, x)
    assert_scaled_grad(jax.jit(jax.grad(qkern.quaxify(loss)))(w, x), want, rtol=1e-4, atol=1e-5)
