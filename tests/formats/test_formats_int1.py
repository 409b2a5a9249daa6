"""int1: each weight is its sign, -1 or +1, times its block's scale (emulated: one byte per
code, like int2..int7; see docs/formats.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern


def weight(k=256, n=40, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (k, n), jnp.float32)


def test_codes_are_signs_and_values_sign_times_scale():
    w = weight()
    q = qkern.quantize(w, "int1")
    codes = np.asarray(q.data)
    assert q.data.dtype == jnp.int8 and set(np.unique(codes)) == {-1, 1}
    np.testing.assert_array_equal(codes, np.where(np.asarray(w) < 0, -1, 1))
    # default blocks of 128 along K; absmax calibration: the scale is the block's absmax
    blocks = np.abs(np.asarray(w)).reshape(2, 128, 40).max(axis=1)
    np.testing.assert_allclose(np.asarray(q.scales), blocks, rtol=1e-6)
    want = np.where(np.asarray(w) < 0, -1.0, 1.0) * np.repeat(blocks, 128, axis=0)
    np.testing.assert_allclose(np.asarray(qkern.dequantize(q)), want, rtol=1e-6)


def test_rms_calibration_sets_the_scale():
    w = weight()
    q = qkern.quantize(w, "int1", calibration=("rms", 1.0), block_size=256)    # per channel
    rms = np.sqrt(np.mean(np.asarray(w) ** 2, axis=0))
    np.testing.assert_allclose(np.asarray(q.scales)[0], rms, rtol=1e-5)
    # the sign quantiser's error with an RMS scale is far below absmax's
    err = lambda q: float(jnp.mean((qkern.dequantize(q) - w) ** 2))
    assert err(q) < 0.5 * err(qkern.quantize(w, "int1", block_size=256))


def test_zero_is_plus_and_a_zero_block_stays_zero():
    w = weight(128, 8).at[:, 3].set(0.0).at[5, 0].set(0.0)
    q = qkern.quantize(w, "int1")
    assert int(q.data[5, 0]) == 1
    d = np.asarray(qkern.dequantize(q))
    assert np.all(d[:, 3] == 0.0)


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_equals_dequantised(m, dtype):
    """Native kernel (small M), the scan (larger M), under jit, both dtypes."""
    w = weight(300, 72)
    q = qkern.quantize(w, "int1", block_size=64)
    x = jax.random.normal(jax.random.PRNGKey(1), (m, 300)).astype(dtype)
    y = jax.jit(qkern.quaxify(lambda x, w: x @ w))(x, q)
    ref = jnp.dot(x.astype(jnp.float32), qkern.dequantize(q), precision=jax.lax.Precision.HIGHEST)
    assert y.dtype == jnp.float32             # promoted with the float32 QArray, as dense
    tol = 2e-5
    assert float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))) < tol


def test_grad_through_the_matmul():
    q = qkern.quantize(weight(), "int1")
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 256))
    g = jax.grad(lambda x: jnp.sum(qkern.quaxify(lambda x, w: x @ w)(x, q) ** 2))(x)
    d = qkern.dequantize(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(lambda x: jnp.sum((x @ d) ** 2))(x)),
                               rtol=1e-4, atol=1e-3)


def test_storage_bytes_and_bits_per_parameter():
    q = qkern.quantize(weight(), "int1")              # [256, 40], blocks of 128
    assert q.nbytes() == 256 * 40 + 2 * 40 * 4
    assert q.bits_per_parameter() == pytest.approx(8 + 32 / 128)


def test_zero_points_refused_with_a_reason():
    with pytest.raises(ValueError, match="integer formats of 2 bits or more, not int1"):
        qkern.quantize(weight(), "int1", calibration="minmax")
    with pytest.raises(ValueError, match="integer formats of 2 bits or more, not int1"):
        qkern.Rule(fmt="int1", calibration="minmax")
    with pytest.raises(ValueError, match="integer formats of 2 bits or more, not int1"):
        qkern.quantize(weight(), "int1", calibration="minmax", gptq=jnp.eye(256))


def test_asymmetric_fixed_range_is_symmetric_for_int1():
    q = qkern.quantize(weight(), "int1", calibration=("fixed", -1.0, 3.0))
    assert q.zeros is None
    np.testing.assert_allclose(np.asarray(q.scales), 3.0)


def test_gptq_chooses_signs(tmp_path):
    w = weight(128, 16)
    x = jax.random.normal(jax.random.PRNGKey(3), (512, 128))
    q = qkern.quantize(w, "int1", gptq=x.T @ x)
    assert set(np.unique(np.asarray(q.data))) <= {-1, 1}
    rtn = qkern.quantize(w, "int1")
    out_err = lambda q: float(jnp.mean((x @ qkern.dequantize(q) - x @ w) ** 2))
    assert out_err(q) < out_err(rtn)
    path = tmp_path / "int1.safetensors"
    qkern.save(path, {"w": q})
    back = qkern.load(path)["w"]
    assert back.fmt == "int1"
    np.testing.assert_array_equal(np.asarray(qkern.dequantize(back)), np.asarray(qkern.dequantize(q)))
