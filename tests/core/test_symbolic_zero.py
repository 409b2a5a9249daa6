"""A Value with no array leaves at all (only static shape and dtype) through jit, cond,
loops, scan, checkpoint, custom_jvp, vmap and grad: transforms see an empty pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from tests.core.qtypes import SymbolicZero, assert_close

lax = jax.lax
F32 = jnp.dtype(jnp.float32)
Z = SymbolicZero((3, 4), F32)
X = jax.random.normal(jax.random.key(1), (2, 3))
two = jnp.float32(2.0)

CASES = {
    # name: (function, expected output type)
    "jit": (lambda x, z: jax.jit(lambda x, z: lax.dot(x, z))(x, z), SymbolicZero),
    "cond_operand": (lambda x, z: lax.cond(True, lambda x, z: lax.dot(x, z),
                                           lambda x, z: lax.dot(x, lax.mul(z, two)), x, z),
                     SymbolicZero),
    "cond_closed": (lambda x, z: lax.cond(False, lambda: lax.dot(x, z),
                                          lambda: lax.add(lax.dot(x, z), 1.0)), None),
    "fori_carry": (lambda x, z: lax.fori_loop(0, 3, lambda i, c: lax.mul(c, two), z),
                   SymbolicZero),
    "scan_const": (lambda x, z: lax.scan(lambda c, xx: (lax.add(c, lax.dot(xx, z)), None),
                                         jnp.ones((2, 4)), jnp.stack([x, x]))[0], None),
    "checkpoint": (lambda x, z: jax.checkpoint(lambda x, z: lax.dot(x, z))(x, z), SymbolicZero),
    "relu": (lambda x, z: jax.nn.relu(z), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_symbolic_zero_through_transforms(name):
    fn, out_type = CASES[name]
    out = qkern.quaxify(fn)(X, Z)
    if out_type is not None:
        assert type(out) is out_type
    assert_close(out, fn(X, Z.materialise()))


def test_symbolic_zero_rule_output_shape():
    out = qkern.quaxify(lambda x, z: lax.dot(x, z))(X, Z)
    assert type(out) is SymbolicZero and out.shape == (2, 4) and out.dtype == F32


def test_symbolic_zero_vmap_and_grad():
    f = lambda x, z: jnp.sin(lax.add(lax.dot(x, z), 1.0))
    xs = jnp.stack([X, 2 * X])
    out = jax.vmap(qkern.quaxify(f), in_axes=(0, None))(xs, Z)
    np.testing.assert_allclose(out, jnp.full((2, 2, 4), np.sin(1.0)), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(qkern.quaxify(f)(x, Z)))(X)
    np.testing.assert_array_equal(g, np.zeros((2, 3), np.float32))  # x @ 0 does not depend on x
    loss = lambda x, z: jnp.sum(jnp.sin(x) + jax.nn.relu(lax.mul(z, two)))
    g = jax.grad(qkern.quaxify(loss))(X, SymbolicZero((2, 3), F32))
    np.testing.assert_allclose(g, jnp.cos(X), rtol=1e-6)
