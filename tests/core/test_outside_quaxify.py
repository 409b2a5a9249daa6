"""A Value used as an array outside `qkern.quaxify` (or closed over by the quaxified
function) raises a TypeError that says what to do, never JAX's or NumPy's generic error
nor a silent object array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

W = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
X = jnp.ones((2, 16))


def _values():
    q = qkern.quantize(W, "int8")
    lora = qkern.LoraArray(W, jnp.zeros((16, 2)), jnp.zeros((2, 8)), 1.0)
    return {"QArray": q, "LoraArray": lora}


OPS = {
    "`@`": lambda v: X @ v,
    "`@` (weight on the left)": lambda v: v @ jnp.ones((8, 3)),
    "`+`": lambda v: v + 1.0,
    "`*`": lambda v: 2.0 * v,
    "indexing": lambda v: v[0],
    "conversion to a NumPy array": lambda v: np.asarray(v),
    "jnp.asarray": lambda v: jnp.asarray(v),
    "closed over": lambda v: qkern.quaxify(lambda x: x @ v)(X),
}


@pytest.mark.parametrize("kind", ["QArray", "LoraArray"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_array_use_outside_quaxify_says_to_wrap_it(kind, op):
    v = _values()[kind]
    with pytest.raises(TypeError, match=rf"{kind} is a qkern Value.*qkern\.quaxify"):
        OPS[op](v)


def test_the_message_names_the_way_to_a_plain_array():
    with pytest.raises(TypeError, match=r"qkern\.dequantize\(q\)"):
        X @ _values()["QArray"]
    with pytest.raises(TypeError, match=r"v\.materialise\(\)"):
        X @ _values()["LoraArray"]


def test_inside_quaxify_the_same_operations_work():
    q = _values()["QArray"]
    y = qkern.quaxify(lambda x, w: (x @ w + 1.0) * 2.0)(X, q)
    want = (X @ qkern.dequantize(q) + 1.0) * 2.0
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    row = qkern.quaxify(lambda w: w[0])(q)
    np.testing.assert_allclose(np.asarray(row), np.asarray(qkern.dequantize(q)[0]),
                               rtol=1e-6)


def test_an_equinox_model_called_outside_quaxify_says_to_wrap_it():
    import equinox as eqx

    lin = eqx.nn.Linear(64, 32, key=jax.random.PRNGKey(0))
    qlin = qkern.quantize(lin, "int8", where=r"weight")
    assert isinstance(qlin.weight, qkern.QArray)
    with pytest.raises(TypeError, match=r"QArray is a qkern Value.*qkern\.quaxify"):
        qlin(jnp.ones(64))
    assert qkern.quaxify(qlin)(jnp.ones(64)).shape == (32,)
