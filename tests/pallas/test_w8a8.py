"""W8A8: per-row int8 activations times int8 weights, int32 accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkern.pallas.w8a8 import w8a8_matmul
from qkern.pallas._xla_w8a8 import quantize_rows, w8a8_reference

from .cases import SHAPES, assert_matches, make_case, reference_matmul


@pytest.mark.parametrize("opts", [{}, dict(block_size=128)], ids=["per-channel", "block128"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(opts, shape, dtype):
    m, k, n = shape
    x, _, op = make_case("int8", opts, m, k, n, dtype)
    y = w8a8_matmul(x, op)
    assert y.dtype == dtype
    assert_matches(y, w8a8_reference(x, op))
    # and close to the weight-only result: activation rounding is the only difference
    y_wo = np.asarray(reference_matmul(x.astype(jnp.float32), op))
    rel = np.linalg.norm(np.asarray(y, np.float32) - y_wo) / np.linalg.norm(y_wo)
    assert rel < 0.02


def test_integer_accumulation_is_exact():
    # small integers: every product and sum is exact in int32, so y equals the exact value
    x = jnp.array([[127.0, -127.0, 64.0, 0.0]])
    w = jnp.array([[25.0], [-3.0], [50.0], [127.0]]) * 0.5   # codes 25, -3, 50, 127 exactly
    import qkern
    from qkern.pallas import stored_operand
    op = stored_operand(qkern.quantize(w, "int8"))
    np.testing.assert_allclose(w8a8_matmul(x, op), x @ w, rtol=1e-6)


def test_row_quantisation_zero_rows():
    q, s = quantize_rows(jnp.zeros((2, 8)))
    assert not np.any(np.isnan(np.asarray(s))) and np.all(np.asarray(q) == 0)


def test_grad_is_straight_through():
    x, _, op = make_case("int8", {}, 3, 256, 64, jnp.float32)
    g = jax.grad(lambda x: jnp.sum(w8a8_matmul(x, op)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(reference_matmul(x, op)))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_rejects_non_int8_weights():
    _, _, op = make_case("int4", {}, 1, 256, 64, jnp.float32)
    with pytest.raises(ValueError, match="symmetric int8"):
        w8a8_matmul(jnp.ones((1, 256)), op)
    _, _, op = make_case("int8", dict(calibration="minmax"), 1, 256, 64, jnp.float32)
    with pytest.raises(ValueError, match="zero points"):
        w8a8_matmul(jnp.ones((1, 256)), op)
