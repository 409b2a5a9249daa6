"""A higher-order primitive that qkern does not know: its Value operands are materialised,
with a warning naming the primitive, and the result is correct."""

import jax
import jax.numpy as jnp
import warnings

import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir

import qkern
from tests.core.qtypes import assert_close, make_scaled

my_hop_p = Primitive("my_fancy_hop")
my_hop_p.multiple_results = True


def _impl(*args, jaxpr):
    return jax.core.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, *args)


my_hop_p.def_impl(_impl)
my_hop_p.def_abstract_eval(lambda *avals, jaxpr: jaxpr.out_avals)
mlir.register_lowering(my_hop_p, mlir.lower_fun(_impl, multiple_results=True))


def my_hop(fn, *args):
    """Call `fn(*args)` through a primitive whose params hold the ClosedJaxpr of `fn`."""
    closed = jax.make_jaxpr(fn)(*args)
    return my_hop_p.bind(*args, jaxpr=closed)


def body(x, w):
    return jnp.tanh(x @ w)


def test_unknown_higher_order_primitive_materialises_with_warning():
    w = make_scaled()
    x = jax.random.normal(jax.random.key(1), (2, 3))
    f = qkern.quaxify(lambda x, w: my_hop(body, x, w))
    with pytest.warns(UserWarning, match="my_fancy_hop"):
        (out,) = f(x, w)
    assert not isinstance(out, qkern.Value)
    assert_close(out, body(x, w.materialise()))
    with pytest.warns(UserWarning, match="my_fancy_hop"):
        (out,) = jax.jit(f)(x, w)
    assert_close(out, body(x, w.materialise()))


def test_unknown_higher_order_primitive_without_values_is_silent():
    x = jax.random.normal(jax.random.key(1), (2, 3))
    w = make_scaled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (out,), _ = qkern.quaxify(lambda x, w: (my_hop(jnp.sin, x), w))(x, w)
    np.testing.assert_allclose(out, jnp.sin(x), rtol=1e-6)


def test_scatter_and_reductions_with_a_combiner_jaxpr_are_first_order_and_silent():
    """scatter-add's update jaxpr and lax.reduce's monoid are scalar combiners, not bodies
    that could hold a Value: no higher-order warning, the default path, right results."""
    w = make_scaled()
    dense = w.materialise()
    fns = [lambda w: w.at[:, 1].add(3.0),
           lambda w: w.at[0].multiply(2.0),
           lambda w: jax.lax.reduce(w, 0.0, lambda a, b: a + 2 * b, (0,)),
           lambda w: jax.lax.reduce_window(w, 0.0, lambda a, b: a + 2 * b, (2, 1), (1, 1), "VALID")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in fns:
            assert_close(qkern.quaxify(fn)(w), fn(dense))
            assert_close(jax.jit(qkern.quaxify(fn))(w), fn(dense))
