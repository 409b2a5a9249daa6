"""custom_jvp and custom_vjp functions with Values: jax.nn's own, and user functions whose
derivative rules differ from autodiff, so the tests can tell that the custom rule ran.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from tests.core.qtypes import (Scaled, assert_close, assert_scaled_grad, field_grads,
                               make_scaled)

lax = jax.lax


def _x(shape=(2, 3), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def W(dtype=jnp.float32):
    return make_scaled((3, 4), 0.5, dtype)


# A weight for the loss whose entries lie well outside [-0.1, 0.1], so clipping shows.
C = (jnp.arange(12.0).reshape(3, 4) - 5.5) / 4


# -- jax.nn ---------------------------------------------------------------------------------
NN = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "softmax": lambda v: jax.nn.softmax(v, axis=-1),
    "silu": jax.nn.silu,
    "logsumexp": lambda v: jax.nn.logsumexp(v, axis=0),
}


@pytest.mark.parametrize("name", sorted(NN))
def test_jax_nn_on_value(name):
    fn = NN[name]
    w, x = W(), _x()
    assert_close(qkern.quaxify(fn)(w), fn(w.materialise()))
    assert_close(qkern.quaxify(lambda x, w: fn(lax.dot(x, w)))(x, w), fn(x @ w.materialise()))
    loss = lambda w: jnp.sum(fn(w) * C[: fn(w).shape[0]] if fn(w).ndim == 2 else fn(w))
    assert_scaled_grad(jax.grad(qkern.quaxify(loss))(w), field_grads(loss, w))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_relu_grad_under_jit_dtypes(dtype):
    w = W(dtype)
    loss = lambda w: jnp.sum(jax.nn.relu(w) * C.astype(dtype)).astype(jnp.float32)
    g = jax.jit(jax.grad(qkern.quaxify(loss)))(w)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
    assert g.data.dtype == dtype
    assert_scaled_grad(g, field_grads(loss, w), **tol)


# -- a user custom_jvp whose rule is not the autodiff one -----------------------------------
@jax.custom_jvp
def exp3(v):
    return jnp.exp(v)


@exp3.defjvp
def _exp3_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return jnp.exp(v), 3.0 * t  # deliberately not exp(v) * t


def test_user_custom_jvp_forward_and_jvp():
    w = W()
    assert_close(qkern.quaxify(exp3)(w), jnp.exp(w.materialise()))
    tw = Scaled(jnp.ones((3, 4)), jnp.float32(0.2))
    p, t = jax.jvp(qkern.quaxify(exp3), (w,), (tw,))
    # tangent of the materialised array: d*ts + td*s; the custom rule multiplies it by 3
    dense_t = w.data * tw.scale + tw.data * w.scale
    assert_close(p, jnp.exp(w.materialise()))
    assert_close(t, 3.0 * dense_t)


@pytest.mark.parametrize("wrap", ["grad", "jit_grad", "grad_jit", "value_and_grad"])
def test_user_custom_jvp_grad_wrt_value_fields(wrap):
    # L = sum(exp3(d * s) * C): with the custom rule dL/dW = 3 C, so
    # dL/dd = 3 C s and dL/ds = sum(3 C d).  (Autodiff would give exp(W) C s.)
    w = W()
    loss = lambda w: jnp.sum(exp3(w) * C)
    q = qkern.quaxify(loss)
    g = {"grad": lambda: jax.grad(q)(w),
         "jit_grad": lambda: jax.jit(jax.grad(q))(w),
         "grad_jit": lambda: jax.grad(jax.jit(q))(w),
         "value_and_grad": lambda: jax.value_and_grad(q)(w)[1]}[wrap]()
    assert_scaled_grad(g, (3 * C * w.scale, jnp.sum(3 * C * w.data)))
    autodiff = jnp.exp(w.materialise()) * C * w.scale
    assert not np.allclose(g.data, autodiff)


def test_user_custom_jvp_with_value_and_plain_operands():
    @jax.custom_jvp
    def f(a, b):
        return a * b

    f.defjvp(lambda p, t: (p[0] * p[1], 5.0 * t[0] * p[1] + 7.0 * p[0] * t[1]))
    w, y = W(), _x((3, 4), seed=4)
    loss = lambda w, y: jnp.sum(f(w, y))
    gw, gy = jax.grad(qkern.quaxify(loss), argnums=(0, 1))(w, y)
    assert_scaled_grad(gw, (5.0 * y * w.scale, jnp.sum(5.0 * y * w.data)))
    np.testing.assert_allclose(gy, 7.0 * w.materialise(), rtol=1e-6)


def test_user_custom_jvp_closing_over_value():
    # Bug: a custom_jvp function that closes over a Value raised UnexpectedTracerError
    # (its fun/jvp ran under traces that did not know the Value's tracer).
    w, x = W(), _x()

    def model(x, w):
        @jax.custom_jvp
        def f(v):
            return lax.dot(v, w)

        f.defjvp(lambda p, t: (lax.dot(p[0], w), 2.0 * lax.dot(t[0], w)))
        return jnp.sum(f(x))

    assert_close(qkern.quaxify(model)(x, w), model(x, w.materialise()))
    g = jax.grad(qkern.quaxify(model))(x, w)
    np.testing.assert_allclose(g, 2.0 * jnp.ones((2, 4)) @ w.materialise().T, rtol=1e-5)


# -- a user custom_vjp: gradient clipping ---------------------------------------------------
@jax.custom_vjp
def clip_grad(v):
    return v


clip_grad.defvjp(lambda v: (v, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


def _clip_expected(w):
    cl = jnp.clip(C, -0.1, 0.1)
    return cl * w.scale, jnp.sum(cl * w.data)


@pytest.mark.parametrize("wrap", ["grad", "jit_grad", "grad_jit", "value_and_grad"])
def test_user_custom_vjp_value_passed_in(wrap):
    w = W()
    loss = lambda w: jnp.sum(clip_grad(w) * C)
    q = qkern.quaxify(loss)
    if wrap == "value_and_grad":
        val, g = jax.value_and_grad(q)(w)
        np.testing.assert_allclose(val, loss(w.materialise()), rtol=1e-6)
    else:
        g = {"grad": jax.grad(q), "jit_grad": jax.jit(jax.grad(q)),
             "grad_jit": jax.grad(jax.jit(q))}[wrap](w)
    assert_scaled_grad(g, _clip_expected(w))


def test_user_custom_vjp_forward_only():
    w = W()
    out = qkern.quaxify(clip_grad)(w)
    assert_close(out, w.materialise())


def test_user_custom_vjp_vmap_of_grad():
    ws = Scaled(jax.random.normal(jax.random.key(2), (3, 3, 4)), jnp.array([0.5, 1.0, 2.0]))
    loss = lambda w: jnp.sum(clip_grad(w) * C)
    g = jax.vmap(jax.grad(qkern.quaxify(loss)))(ws)
    for i in range(3):
        wi = Scaled(ws.data[i], ws.scale[i])
        assert_scaled_grad(Scaled(g.data[i], g.scale[i]), _clip_expected(wi))


@jax.custom_vjp
def scaled_product(v, u):
    return v * u


def _sp_fwd(v, u):
    return v * u, (v, u)  # the residual v is the (Value) input itself


def _sp_bwd(res, g):
    v, u = res
    return jnp.clip(g * u, -0.1, 0.1), 3.0 * g * v


scaled_product.defvjp(_sp_fwd, _sp_bwd)


@pytest.mark.parametrize("value_first", [True, False])
def test_user_custom_vjp_residuals_are_values(value_first):
    w, y = W(), C
    if value_first:
        loss = lambda w, y: jnp.sum(scaled_product(w, y))
    else:
        loss = lambda w, y: jnp.sum(scaled_product(y, w))
    gw, gy = jax.grad(qkern.quaxify(loss), argnums=(0, 1))(w, y)
    ref = jax.grad(lambda d, s, y: loss(Scaled(d, s).materialise(), y), argnums=(0, 1, 2))(
        w.data, w.scale, y)
    assert_scaled_grad(gw, ref[:2])
    np.testing.assert_allclose(gy, ref[2], rtol=1e-6)
    gw2, _ = jax.jit(jax.grad(qkern.quaxify(loss), argnums=(0, 1)))(w, y)
    assert_scaled_grad(gw2, ref[:2])


def test_user_custom_vjp_computed_value_residual():
    @jax.custom_vjp
    def f(v, u):
        return v * u

    def fwd(v, u):
        return v * u, (lax.mul(v, jnp.float32(2.0)), u)  # a new Value as residual

    def bwd(res, g):
        v2, u = res
        return jnp.clip(g * u, -0.1, 0.1), g * v2

    f.defvjp(fwd, bwd)
    w = W()
    loss = lambda w, y: jnp.sum(f(w, y))
    gw, gy = jax.grad(qkern.quaxify(loss), argnums=(0, 1))(w, C)
    cl = jnp.clip(C, -0.1, 0.1)
    assert_scaled_grad(gw, (cl * w.scale, jnp.sum(cl * w.data)))
    np.testing.assert_allclose(gy, 2.0 * w.materialise(), rtol=1e-6)


def test_user_custom_vjp_nondiff_argnums():
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def clip_by(c, v):
        return v

    clip_by.defvjp(lambda c, v: (v, None), lambda c, _, g: (jnp.clip(g, -c, c),))
    w = W()
    g = jax.grad(qkern.quaxify(lambda w: jnp.sum(clip_by(0.1, w) * C)))(w)
    assert_scaled_grad(g, _clip_expected(w))


def test_user_custom_vjp_closing_over_value():
    # Bug: a custom_vjp function that closes over a Value raised UnexpectedTracerError
    # even in a plain forward call (its fun/fwd/bwd ran under traces that did not know
    # the Value's tracer). Gradients w.r.t. the plain operand must use the custom bwd.
    w, x = W(), _x()

    def model(x, w):
        @jax.custom_vjp
        def f(v):
            return lax.dot(v, w)

        f.defvjp(lambda v: (lax.dot(v, w), None),
                 lambda _, g: (jnp.clip(g @ jnp.ones((4, 3)), -0.1, 0.1),))
        return jnp.sum(f(x) * 3.0)

    assert_close(qkern.quaxify(model)(x, w), model(x, w.materialise()))
    want = jnp.full((2, 3), 0.1)  # every raw cotangent is 3 * 4 = 12, clipped to 0.1
    np.testing.assert_allclose(jax.grad(qkern.quaxify(model))(x, w), want)
    np.testing.assert_allclose(jax.jit(jax.grad(qkern.quaxify(model)))(x, w), want)


def test_user_custom_vjp_value_passed_in_with_another_value_closed_over():
    # Same bug, on the path where a Value is also an operand: fwd/bwd ran under a fresh
    # trace that did not recognise the closed-over Value's tracer.
    w, u = W(), make_scaled((3, 4), 2.0, seed=3)

    def model(w, u):
        @jax.custom_vjp
        def f(v):
            return lax.mul(v, u)

        f.defvjp(lambda v: (lax.mul(v, u), None), lambda _, g: (jnp.clip(g * 3.0, -0.1, 0.1),))
        return jnp.sum(f(w))

    assert_close(qkern.quaxify(model)(w, u), model(w.materialise(), u.materialise()))
    g = jax.grad(qkern.quaxify(model))(w, u)
    assert_scaled_grad(g, (jnp.full((3, 4), 0.1) * w.scale, jnp.sum(0.1 * w.data)))


def test_user_custom_jvp_value_passed_in_with_another_value_closed_over():
    w, u = W(), make_scaled((3, 4), 2.0, seed=3)

    def model(w, u):
        @jax.custom_jvp
        def f(v):
            return lax.mul(v, u)

        f.defjvp(lambda p, t: (lax.mul(p[0], u), 3.0 * t[0]))
        return jnp.sum(f(w) * C)

    assert_close(qkern.quaxify(model)(w, u), model(w.materialise(), u.materialise()))
    g = jax.grad(qkern.quaxify(model))(w, u)
    assert_scaled_grad(g, (3 * C * w.scale, jnp.sum(3 * C * w.data)))


# -- custom derivatives on plain arrays while a Value is present ----------------------------
# Inside quaxify every custom_jvp/custom_vjp call goes through qkern's wrappers (its function
# may close over a Value), even when no operand is a Value: results must stay bit-identical.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _clip_by(c, v):
    return v


_clip_by.defvjp(lambda c, v: (v, None), lambda c, _, g: (jnp.clip(g, -c, c),))


@jax.custom_vjp
def _times_int(v, n):
    return v * n


_times_int.defvjp(lambda v, n: (v * n, n), lambda n, g: (jnp.clip(g * n, -0.1, 0.1), None))


@jax.custom_jvp
def _sym_mul(v, u):
    return v * u


@functools.partial(_sym_mul.defjvp, symbolic_zeros=True)
def _sym_mul_jvp(primals, tangents):
    (v, u), (tv, tu) = primals, tangents
    out = jnp.zeros_like(v)
    if type(tv) is not jax.custom_derivatives.SymbolicZero:
        out = out + 5.0 * tv * u
    if type(tu) is not jax.custom_derivatives.SymbolicZero:
        out = out + v * tu
    return v * u, out


PLAIN = {
    "vmap_relu": lambda x: jax.vmap(jax.nn.relu)(x),
    "grad_clip": jax.grad(lambda x: jnp.sum(clip_grad(x) * 3.0)),
    "jit_grad_clip": jax.jit(jax.grad(lambda x: jnp.sum(clip_grad(x) * 3.0))),
    "vmap_grad_clip": jax.vmap(jax.grad(lambda x: jnp.sum(clip_grad(x) * 3.0))),
    "grad_nondiff": jax.grad(lambda x: jnp.sum(_clip_by(0.05, x) * 3.0)),
    "grad_int_operand": jax.grad(lambda x: jnp.sum(_times_int(x, 3))),
    "grad_symbolic_zeros": jax.grad(lambda x: jnp.sum(_sym_mul(x, jnp.ones_like(x)))),
    "grad_exp3": jax.grad(lambda x: jnp.sum(exp3(x))),
    "jvp_relu": lambda x: jax.jvp(jax.nn.relu, (x,), (jnp.ones_like(x),)),
    "jacfwd_relu": lambda x: jax.jacfwd(jax.nn.relu)(x[0]),
    "hessian_softplus": lambda x: jax.hessian(lambda r: jnp.sum(jax.nn.softplus(r)))(x[0]),
    "remat_grad_relu": jax.grad(lambda x: jnp.sum(jax.checkpoint(jax.nn.relu)(x))),
    "cond_grad_clip": jax.grad(lambda x: lax.cond(True, lambda x: jnp.sum(clip_grad(x) * 3.0),
                                                  jnp.sum, x)),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_custom_derivatives_on_plain_arrays_unchanged_with_value_present(name):
    fn = PLAIN[name]
    x = _x((3, 4), seed=5)
    got = qkern.quaxify(lambda w, x: fn(x))(W(), x)
    want = fn(x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
