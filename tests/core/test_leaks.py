"""No tracer leaks: representative quaxified functions under `jax.checking_leaks()`."""

import jax
import jax.numpy as jnp
import pytest

import qkern
from tests.core.qtypes import Scaled, assert_close, make_scaled

lax = jax.lax
X = jax.random.normal(jax.random.key(1), (2, 3))


@jax.custom_vjp
def _clip(v):
    return v


_clip.defvjp(lambda v: (v, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


@jax.custom_jvp
def _exp3(v):
    return jnp.exp(v)


_exp3.defjvp(lambda p, t: (jnp.exp(p[0]), 3.0 * t[0]))

_STACK = Scaled(jax.random.normal(jax.random.key(2), (2, 3, 4)), jnp.array([1.0, 2.0]))

CASES = {
    "eager": lambda w: qkern.quaxify(lambda w: jnp.tanh(X @ w))(w),
    "jit_outside": lambda w: jax.jit(qkern.quaxify(lambda w: jnp.tanh(X @ w)))(w),
    "jit_inside": lambda w: qkern.quaxify(lambda w: jax.jit(lambda w: lax.dot(X, w))(w))(w),
    "grad": lambda w: jax.grad(qkern.quaxify(lambda w: jnp.sum(jnp.sin(X @ w))))(w),
    "jit_grad": lambda w: jax.jit(jax.grad(qkern.quaxify(lambda w: jnp.sum(X @ w))))(w),
    "cond": lambda w: qkern.quaxify(lambda w: lax.cond(True, lambda: lax.dot(X, w),
                                                       lambda: -lax.dot(X, w)))(w),
    "grad_cond": lambda w: jax.grad(qkern.quaxify(lambda w: lax.cond(
        False, lambda w: jnp.sum(w), lambda w: jnp.sum(lax.dot(X, w)), w)))(w),
    "while": lambda w: qkern.quaxify(lambda w: lax.fori_loop(
        0, jnp.int32(3), lambda i, c: lax.mul(c, jnp.float32(2)), w))(w),
    "scan": lambda w: qkern.quaxify(lambda w: lax.scan(
        lambda c, x: (c + jnp.sum(lax.dot(x, w)), None), jnp.float32(0), jnp.stack([X, X])))(w),
    "scan_xs": lambda w: qkern.quaxify(lambda ws: lax.scan(
        lambda c, v: (c + jnp.sum(lax.dot(X, v)), None), jnp.float32(0), ws))(_STACK),
    "remat_grad": lambda w: jax.grad(qkern.quaxify(
        lambda w: jnp.sum(jax.checkpoint(lambda w: jnp.sin(lax.dot(X, w)))(w))))(w),
    "custom_jvp": lambda w: jax.grad(qkern.quaxify(lambda w: jnp.sum(_exp3(w))))(w),
    "relu": lambda w: jax.jit(jax.grad(qkern.quaxify(lambda w: jnp.sum(jax.nn.relu(w)))))(w),
    "custom_vjp": lambda w: jax.grad(qkern.quaxify(lambda w: jnp.sum(_clip(w))))(w),
    "jit_grad_custom_vjp": lambda w: jax.jit(jax.grad(qkern.quaxify(
        lambda w: jnp.sum(_clip(w)))))(w),
    "grad_jit_custom_vjp": lambda w: jax.grad(jax.jit(qkern.quaxify(
        lambda w: jnp.sum(_clip(w)))))(w),
    "vmap": lambda w: jax.vmap(qkern.quaxify(lambda x, w: lax.dot(x, w)), in_axes=(0, None))(
        jnp.stack([X, X]), w),
    "nested": lambda w: qkern.quaxify(lambda w: qkern.quaxify(jnp.sin)(w * 2.0))(w),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_tracer_leaks(name):
    w = make_scaled()
    with jax.checking_leaks():
        out = CASES[name](w)
    # and the result is a real, usable value afterwards
    jax.block_until_ready(jax.tree_util.tree_leaves(out))


def test_no_leak_when_value_is_returned():
    w = make_scaled()
    with jax.checking_leaks():
        out = qkern.quaxify(lambda w: lax.mul(w, jnp.float32(2)))(w)
    assert type(out) is Scaled
    assert_close(out, w.materialise() * 2)
