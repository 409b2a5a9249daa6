"""Values through lax.cond / switch / while_loop / fori_loop / scan and jax.checkpoint:
as operands, closed over, as loop carries and scanned-over xs.

Bodies use lax-level operations so the rule log shows that rules ran inside the
transformed functions (rather than the Values being materialised at the boundary).
"""

import warnings

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


def c32(v):
    return jnp.asarray(v, jnp.float32)


def W():
    return make_scaled((3, 4), 0.5)


# -- cond / switch ------------------------------------------------------------------------
@pytest.mark.parametrize("pred", [True, False])
def test_cond_value_as_operand(pred, log):
    w, x = W(), _x()

    def f(x, w, p):
        return lax.cond(p, lambda x, w: lax.dot(x, w), lambda x, w: lax.dot(x, lax.neg(w)), x, w)

    assert_close(qkern.quaxify(f)(x, w, pred), f(x, w.materialise(), pred))
    assert "dot[Array,Scaled]" in log


@pytest.mark.parametrize("pred", [True, False])
def test_cond_value_closed_over(pred, log):
    w, x = W(), _x()

    def f(x, w, p):
        return lax.cond(p, lambda: jnp.sin(lax.dot(x, w)), lambda: lax.dot(x, lax.mul(w, c32(3))))

    assert_close(qkern.quaxify(f)(x, w, pred), f(x, w.materialise(), pred))
    assert "dot[Array,Scaled]" in log


@pytest.mark.parametrize("pred", [True, False])
def test_cond_both_branches_return_values(pred):
    w = W()
    f = lambda w, p: lax.cond(p, lambda w: lax.mul(w, c32(2)), lambda w: lax.neg(w), w)
    out = qkern.quaxify(f)(w, pred)
    assert type(out) is Scaled  # the Value keeps its type through cond
    assert_close(out, f(w.materialise(), pred))


@pytest.mark.parametrize("pred", [True, False])
def test_cond_value_branch_vs_plain_branch(pred):
    w = W()
    f = lambda w, p: lax.cond(p, lambda w: lax.mul(w, c32(2)), lambda w: jnp.sin(w), w)
    out = qkern.quaxify(f)(w, pred)
    assert not isinstance(out, qkern.Value)
    assert_close(out, f(w.materialise(), pred))


def test_cond_traced_and_batched_predicates():
    w, x = W(), _x()
    f = lambda x, w, p: lax.cond(p, lambda: lax.dot(x, w), lambda: lax.dot(x, lax.mul(w, c32(2))))
    for p in (True, False):
        assert_close(jax.jit(qkern.quaxify(f))(x, w, p), f(x, w.materialise(), p))
    ps = jnp.array([True, False, True])
    want = jax.vmap(f, in_axes=(None, None, 0))(x, w.materialise(), ps)
    assert_close(jax.vmap(qkern.quaxify(f), in_axes=(None, None, 0))(x, w, ps), want)
    assert_close(qkern.quaxify(jax.vmap(f, in_axes=(None, None, 0)))(x, w, ps), want)


@pytest.mark.parametrize("index", [0, 1, 2, 7, -3])
def test_switch(index, log):
    w, x = W(), _x()
    branches = [
        lambda x, w: lax.dot(x, w),
        lambda x, w: lax.dot(x, lax.mul(w, c32(2))),
        lambda x, w: jnp.cos(x) @ jnp.ones((3, 4)) + jnp.sum(w),
    ]
    f = lambda x, w, i: lax.switch(i, branches, x, w)
    assert_close(qkern.quaxify(f)(x, w, index), f(x, w.materialise(), index))
    assert_close(jax.jit(qkern.quaxify(f))(x, w, index), f(x, w.materialise(), index))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_switch_value_closed_over(index, log):
    w, x = W(), _x()

    def f(x, w, i):
        branches = [
            lambda x: lax.dot(x, w),
            lambda x: lax.dot(x, lax.neg(w)),
            lambda x: jnp.sin(x) @ jnp.ones((3, 4)),
        ]
        return lax.switch(i, branches, x)

    assert_close(qkern.quaxify(f)(x, w, index), f(x, w.materialise(), index))
    assert "dot[Array,Scaled]" in log


def test_grad_through_cond_wrt_value():
    w, x = W(), _x()
    loss = lambda w, x: lax.cond(jnp.sum(x) > -100, lambda: jnp.sum(jnp.sin(lax.dot(x, w))),
                                 lambda: jnp.sum(lax.dot(x, w)))
    g = jax.grad(qkern.quaxify(loss))(w, x)
    assert_scaled_grad(g, field_grads(loss, w, x))


# -- while / fori ---------------------------------------------------------------------------
def test_fori_loop_value_carry_keeps_type(log):
    w = W()
    out = qkern.quaxify(lambda w: lax.fori_loop(0, 3, lambda i, c: lax.mul(c, c32(2)), w))(w)
    assert type(out) is Scaled
    np.testing.assert_allclose(out.data, w.data * 8, rtol=1e-6)
    np.testing.assert_allclose(out.scale, w.scale, rtol=1e-6)
    assert "mul[Scaled,Array]" in log


def test_while_loop_value_carry_with_counter():
    w = W()

    def f(w):
        return lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, lax.neg(c[1])), (0, w))

    n, out = qkern.quaxify(f)(w)
    assert int(n) == 4 and type(out) is Scaled
    assert_close(out, w.materialise())
    n, out = jax.jit(qkern.quaxify(f))(w)
    assert type(out) is Scaled
    assert_close(out, w.materialise())


def test_fori_loop_value_closed_over_in_body(log):
    w, x = W(), _x()
    f = lambda x, w: lax.fori_loop(0, 3, lambda i, c: jnp.tanh(lax.dot(c, w)) @ jnp.ones((4, 3)), x)
    assert_close(qkern.quaxify(f)(x, w), f(x, w.materialise()))
    assert "dot[Array,Scaled]" in log


def test_while_loop_value_closed_over_in_cond():
    w, x = W(), _x()
    thresh = lambda w: jnp.sum(jnp.abs(w))
    f = lambda x, w: lax.while_loop(lambda c: jnp.sum(jnp.abs(c)) < thresh(w),
                                    lambda c: c * 1.5, x)
    assert_close(qkern.quaxify(f)(x, w), f(x, w.materialise()))


def test_fori_loop_dynamic_trip_count_under_jit():
    w = W()
    f = lambda w, n: lax.fori_loop(0, n, lambda i, c: lax.mul(c, c32(1.5)), w)
    out = jax.jit(qkern.quaxify(f))(w, 3)
    assert type(out) is Scaled
    assert_close(out, f(w.materialise(), 3))


def test_while_loop_carry_changing_type_warns_and_is_correct():
    w = W()
    f = lambda w: lax.fori_loop(0, 2, lambda i, c: jnp.sin(c), w)
    with pytest.warns(UserWarning, match="carr"):
        out = qkern.quaxify(f)(w)
    assert_close(out, f(w.materialise()))


def test_grad_through_fori_loop_wrt_value():
    w, x = W(), _x()
    loss = lambda w, x: jnp.sum(lax.fori_loop(0, 3, lambda i, c: jnp.tanh(lax.dot(c, w))
                                              @ jnp.ones((4, 3)), x))
    assert_scaled_grad(jax.grad(qkern.quaxify(loss))(w, x), field_grads(loss, w, x), rtol=1e-4)
    loss2 = lambda w, x: jnp.sum(lax.fori_loop(0, 3, lambda i, c: lax.mul(c, c32(1.5)), w))
    assert_scaled_grad(jax.grad(qkern.quaxify(loss2))(w, x), field_grads(loss2, w, x))


# -- scan ---------------------------------------------------------------------------------
def test_scan_value_as_carry(log):
    w = W()
    xs = jnp.arange(1.0, 4.0)
    f = lambda w: lax.scan(lambda c, s: (lax.mul(c, s), jnp.sum(c)), w, xs)
    carry, ys = qkern.quaxify(f)(w)
    assert type(carry) is Scaled
    np.testing.assert_allclose(carry.data, w.data * 6, rtol=1e-6)
    np.testing.assert_allclose(carry.scale, w.scale, rtol=1e-6)
    assert_close(ys, f(w.materialise())[1])
    assert "mul[Scaled,Array]" in log


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_value_closed_over_as_const(reverse, log):
    w = W()
    xs = jnp.stack([_x(seed=i) for i in range(4)])
    f = lambda w: lax.scan(lambda c, xx: (c + jnp.sum(lax.dot(xx, w)) * c, lax.dot(xx, w)),
                           jnp.float32(1.0), xs, reverse=reverse)
    assert_close(qkern.quaxify(f)(w), f(w.materialise()))
    assert "dot[Array,Scaled]" in log


def test_scan_value_as_xs(log):
    ws = Scaled(jax.random.normal(jax.random.key(3), (5, 3, 4)), jnp.linspace(0.5, 1.5, 5))
    x = _x()
    f = lambda ws: lax.scan(lambda c, w: (c + jnp.sum(lax.dot(x, w)), lax.dot(x, w)),
                            jnp.float32(0.0), ws)
    assert_close(qkern.quaxify(f)(ws), f(ws.materialise()))
    assert "dot[Array,Scaled]" in log  # each slice reached the rule as a Scaled


def test_scan_value_as_ys_comes_back_stacked():
    w = W()
    f = lambda w: lax.scan(lambda c, s: (c, lax.mul(c, s)), w, jnp.arange(1.0, 4.0))[1]
    out = qkern.quaxify(f)(w)
    assert out.shape == (3, 3, 4)
    assert_close(out, f(w.materialise()))


def test_grad_through_scan_wrt_value():
    w = W()
    xs = jnp.stack([_x(seed=i) for i in range(3)])
    loss = lambda w, xs: lax.scan(lambda c, xx: (c + jnp.sum(jnp.sin(lax.dot(xx, w))), None),
                                  jnp.float32(0.0), xs)[0]
    assert_scaled_grad(jax.grad(qkern.quaxify(loss))(w, xs), field_grads(loss, w, xs), rtol=1e-4)
    loss2 = lambda w, xs: jnp.sum(lax.scan(lambda c, s: (lax.mul(c, s), None), w,
                                           jnp.arange(1.0, 4.0))[0] ** 2)
    assert_scaled_grad(jax.grad(qkern.quaxify(loss2))(w, xs), field_grads(loss2, w, xs),
                       rtol=1e-4)


# -- checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable])
def test_checkpoint(policy, log):
    w, x = W(), _x()
    inner = jax.checkpoint(lambda x, w: jnp.sin(lax.dot(x, w)), policy=policy)
    loss = lambda w, x: jnp.sum(inner(x, w) ** 2)
    assert_close(qkern.quaxify(lambda x, w: inner(x, w))(x, w), inner(x, w.materialise()))
    assert "dot[Array,Scaled]" in log
    assert_scaled_grad(jax.grad(qkern.quaxify(loss))(w, x), field_grads(loss, w, x))
    assert_scaled_grad(jax.jit(jax.grad(qkern.quaxify(loss)))(w, x), field_grads(loss, w, x))


def test_checkpoint_value_output_keeps_type():
    w = W()
    out = qkern.quaxify(jax.checkpoint(lambda w: lax.mul(w, c32(3))))(w)
    assert type(out) is Scaled
    np.testing.assert_allclose(out.data, w.data * 3, rtol=1e-6)


# -- regression: plain weak-typed carries are not Values ---------------------------------
def test_loop_weak_typed_plain_carry_does_not_warn_about_value_type():
    # Bug: a plain Python-float carry (weak-typed) that the body makes strongly typed was
    # reported as "carry positions [i] change Value type or metadata", though it is no
    # Value at all; JAX itself promotes such a carry silently.
    w, x = W(), _x()
    fs = [
        lambda x, w: lax.scan(lambda c, xx: (c + jnp.sum(lax.dot(xx, w)), None), 0.0,
                              jnp.stack([x, x]))[0],
        lambda x, w: lax.while_loop(lambda c: c[0] < 3,
                                    lambda c: (c[0] + 1, c[1] + jnp.sum(lax.dot(x, w))),
                                    (0, 0.0))[1],
    ]
    for f in fs:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = qkern.quaxify(f)(x, w)
        assert_close(out, f(x, w.materialise()), rtol=1e-5)
