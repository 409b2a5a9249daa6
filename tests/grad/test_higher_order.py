"""Gradients of gradients through every kernel family: each derivative rule calls the
family again (never the bare kernel), so `grad(grad(...))` and `jacrev(jacrev(...))` work
and equal the same computation on the dequantised weight. Forward mode:
test_forward_mode.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

lax = jax.lax


def _key(i):
    return jax.random.PRNGKey(i)


def _grad2(loss, argnums, *args, outer=(0,)):
    """d/d(args[outer]) of |d loss / d args[argnums]|^2: a second-order quantity."""
    inner = jax.grad(loss, argnums=argnums)
    return jax.grad(lambda *a: jnp.sum(inner(*a) ** 2), argnums=outer)(*args)


def _close(got, want, tol):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale)


# M = 1 runs the native small-M kernel, 64 the native GEMM, 300 dequantise-then-dot (CPU)
@pytest.mark.parametrize("m", [1, 64, 300])
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("transposed", [False, True])
def test_weight_only_grad_of_grad(fmt, m, transposed):
    w = jax.random.normal(_key(0), (96, 40)) / 8
    q = qkern.quantize(w, fmt)
    wd = qkern.dequantize(q)
    x = jax.random.normal(_key(m), (m, 40 if transposed else 96))
    mm = (lambda x, w: x @ w.T) if transposed else (lambda x, w: x @ w)
    qloss = qkern.quaxify(lambda x, w: jnp.sum(jnp.tanh(mm(x, w))))
    dloss = lambda x, w: jnp.sum(jnp.tanh(mm(x, w)))                   # noqa: E731
    _close(jax.jit(lambda x: _grad2(qloss, 0, x, q))(x)[0], _grad2(dloss, 0, x, wd)[0], 1e-5)


def test_hessian_by_jacrev_of_jacrev():
    w = jax.random.normal(_key(0), (64, 32)) / 8
    q = qkern.quantize(w, "int4")
    x = jax.random.normal(_key(1), (3, 64))
    f = qkern.quaxify(lambda x, w: jnp.sum(jnp.tanh(x @ w)))
    h = jax.jacrev(jax.jacrev(f))(x, q)
    hd = jax.jacrev(jax.jacrev(f))(x, qkern.dequantize(q))
    assert h.shape == (3, 64, 3, 64)
    _close(h, hd, 1e-5)


def test_w8a8_grad_of_grad_is_straight_through():
    """Second order runs through the straight-through rule: the result is the dense
    one evaluated at the int8-rounded activations' outputs (close, not equal), and the
    rounding itself never zeroes a term."""
    w = jax.random.normal(_key(0), (96, 40)) / 8
    q = qkern.quantize(w, "int8", act_fmt="int8")
    wd = qkern.dequantize(q)
    x = jax.random.normal(_key(2), (16, 96))
    qloss = qkern.quaxify(lambda x, w: jnp.sum(jnp.tanh(x @ w)))
    dloss = lambda x, w: jnp.sum(jnp.tanh(x @ w))                       # noqa: E731
    _close(_grad2(qloss, 0, x, q)[0], _grad2(dloss, 0, x, wd)[0], 0.06)


@pytest.mark.parametrize("transposed", [False, True])
def test_qlora_grad_of_grad(transposed):
    w = jax.random.normal(_key(0), (64, 48)) / 8
    q = qkern.quantize(w, "nf4")
    a = jax.random.normal(_key(1), (64, 4)) * 0.1
    b = jax.random.normal(_key(2), (4, 48)) * 0.1
    x = jax.random.normal(_key(3), (5, 48 if transposed else 64))
    mm = (lambda x, w: x @ w.T) if transposed else (lambda x, w: x @ w)
    fq = qkern.quaxify(lambda lw, x: jnp.sum(jnp.tanh(mm(x, lw))))
    qloss = lambda a, b, x: fq(qkern.LoraArray(q, a, b, alpha=8.0), x)   # noqa: E731
    wd = qkern.dequantize(q)
    dloss = lambda a, b, x: jnp.sum(jnp.tanh(mm(x, wd + 2.0 * a @ b)))  # noqa: E731
    for arg in range(3):
        _close(_grad2(qloss, arg, a, b, x, outer=(0, 1, 2)),
               _grad2(dloss, arg, a, b, x, outer=(0, 1, 2)), 1e-5)


def test_ragged_grad_of_grad():
    w = jax.random.normal(_key(0), (3, 64, 32)) / 8
    q = qkern.quantize(w, "int8")
    x = jax.random.normal(_key(1), (10, 64))
    g = jnp.array([4, 0, 5], jnp.int32)                 # an empty group; 9 of 10 rows
    qloss = qkern.quaxify(lambda x, w: jnp.sum(jnp.tanh(lax.ragged_dot(x, w, g))))
    wd = qkern.dequantize(q)
    dloss = lambda x, w: jnp.sum(jnp.tanh(lax.ragged_dot(x, w, g)))     # noqa: E731
    _close(_grad2(qloss, 0, x, q)[0], _grad2(dloss, 0, x, wd)[0], 1e-5)


@pytest.mark.parametrize("act_fmt", [None, "int8"])
def test_conv_grad_of_grad(act_fmt):
    w = jax.random.normal(_key(0), (3, 3, 8, 16)) / 8                  # HWIO
    q = qkern.quantize(w, "int8", axis=2, act_fmt=act_fmt)
    x = jax.random.normal(_key(1), (2, 9, 9, 8))
    conv = lambda x, w: lax.conv_general_dilated(                       # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    qloss = qkern.quaxify(lambda x, w: jnp.sum(jnp.tanh(conv(x, w))))
    dloss = lambda x, w: jnp.sum(jnp.tanh(conv(x, w)))                  # noqa: E731
    tol = 1e-5 if act_fmt is None else 0.06
    _close(_grad2(qloss, 0, x, q)[0], _grad2(dloss, 0, x, qkern.dequantize(q))[0], tol)
