"""The NaN/inf policy (docs/formats.md, "Non-finite weights"), the same for every format and
for `fake_quant`: eager quantisation of concrete weights refuses non-finite values with a
ValueError that names the leaf and how many; under jit, where nothing can be checked on
the host, the block holding one dequantises to NaN, never to finite codes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.formats import FORMATS

ALL = list(FORMATS)


def weight(k=128, n=8, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (k, n), jnp.float32)


def poisoned(value, k=128, n=8):
    return weight(k, n).at[5, 3].set(value)


# ----------------------------------------------------------------------------- eager


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_eager_quantize_refuses(fmt, bad):
    with pytest.raises(ValueError, match=r"1 of 1024 values are NaN or inf") as e:
        qkern.quantize(poisoned(bad), fmt)
    assert "jnp.nan_to_num" in str(e.value)


def test_eager_refusal_counts_and_names_the_leaf():
    w = weight().at[0, 0].set(np.nan).at[1, 1].set(np.inf).at[2, 2].set(np.nan)
    params = {"layers": [{"kernel": weight(seed=1)}, {"kernel": w}]}
    with pytest.raises(ValueError, match=r"'layers/1/kernel'.*3 of 1024 values are NaN or inf"):
        qkern.quantize(params, "nf4")
    with pytest.raises(ValueError, match=r"'layers/1/kernel'"):
        qkern.quantize(params, rules=[qkern.Rule(where=".*kernel", fmt="int8")])


@pytest.mark.parametrize("fmt", ["int8", "nf4", "mxfp4"])
def test_eager_fake_quant_refuses(fmt):
    with pytest.raises(ValueError, match=r"1 of 1024 values are NaN or inf; qkern.fake_quant refuses"):
        qkern.fake_quant(poisoned(np.nan), fmt)
    with pytest.raises(ValueError, match=r"'w'.*NaN or inf"):
        qkern.fake_quant({"w": poisoned(np.inf)}, rules=[qkern.Rule(fmt="int4")])


def test_eager_gptq_refuses():
    w = poisoned(np.nan)
    with pytest.raises(ValueError, match=r"GPTQ.*NaN or inf|NaN or inf.*GPTQ"):
        qkern.quantize(w, "int4", gptq=jnp.eye(128))


def test_bf16_and_f16_weights_refused_too():
    for dt in (jnp.bfloat16, jnp.float16):
        with pytest.raises(ValueError, match="NaN or inf"):
            qkern.quantize(poisoned(np.inf).astype(dt), "int8")


# ----------------------------------------------------------------------------- under jit


def _options(fmt):
    # blocks of 32 along K (MX has no choice) so the NaN block is a strict part of a column
    return {} if fmt.startswith("mx") else dict(block_size=32)


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_jit_quantize_marks_the_block_nan(fmt, bad):
    w = poisoned(bad)
    q = jax.jit(lambda w: qkern.quantize(w, fmt, **_options(fmt)))(w)
    d = np.asarray(qkern.dequantize(q))
    assert np.isnan(d[5, 3])                       # never a finite code where it stood
    block = np.zeros(d.shape, bool)
    block[0:32, 3] = True                          # the 32-row block of column 3
    assert np.all(np.isnan(d[block]))
    # every other block is what quantising the finite weight gives
    clean = np.asarray(qkern.dequantize(qkern.quantize(w.at[5, 3].set(0.0), fmt, **_options(fmt))))
    np.testing.assert_array_equal(d[~block], clean[~block])


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3"])
def test_jit_double_quant_keeps_nan_scales(fmt):
    w = weight(512, 64).at[70, 9].set(np.nan)
    q = jax.jit(lambda w: qkern.quantize(w, fmt, block_size=32, double_quant=True))(w)
    d = np.asarray(qkern.dequantize(q))
    assert np.all(np.isnan(d[64:96, 9])) and np.isnan(d).sum() == 32
    clean = qkern.quantize(w.at[70, 9].set(0.0), fmt, block_size=32, double_quant=True)
    ok = ~np.isnan(d)
    # the second-level scales are chosen from the finite scales only: nothing else moves
    # further than the double quantisation's own rounding
    np.testing.assert_allclose(d[ok], np.asarray(qkern.dequantize(clean))[ok], atol=2e-2)


@pytest.mark.parametrize("fmt", ["int8", "nf4", "mxfp8", "fp8_e5m2"])
def test_jit_per_tensor_is_all_nan(fmt):
    if fmt.startswith("mx"):
        pytest.raises(ValueError, qkern.quantize, weight(), fmt, axis=None)
        return
    q = jax.jit(lambda w: qkern.quantize(w, fmt, axis=None))(poisoned(np.inf))
    assert bool(jnp.all(jnp.isnan(qkern.dequantize(q))))


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp4", "fp8_e4m3", "mxfp4", "mxfp8"])
def test_jit_matmul_is_nan_where_dense_is_not_finite(fmt):
    """x @ q is NaN exactly in the output columns where x @ w is not finite."""
    w = weight(256, 16).at[100, 11].set(np.nan)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 256), jnp.float32)
    matmul = qkern.quaxify(lambda x, q: x @ q)
    y = jax.jit(lambda x, w: matmul(x, qkern.quantize(w, fmt, **_options(fmt))))(x, w)
    dense = x @ w
    np.testing.assert_array_equal(np.isfinite(np.asarray(y)), np.isfinite(np.asarray(dense)))


def test_jit_fake_quant_is_nan_not_finite():
    w = poisoned(np.nan)
    out = jax.jit(lambda w: qkern.fake_quant(w, "int4", block_size=32))(w)
    assert bool(jnp.isnan(out[5, 3]))
    loss = lambda w: jnp.sum(qkern.fake_quant(w, "nf4", block_size=32))
    with pytest.raises(ValueError, match="NaN or inf"):   # eager grad: the primal is concrete
        jax.grad(loss)(w)
    v, g = jax.jit(jax.value_and_grad(loss))(w)
    assert bool(jnp.isnan(v)) and g.shape == w.shape      # straight through


def test_mx_nan_scale_code_decodes_to_nan():
    """The E8M0 scale code 0xFF is NaN (OCP MX); every stored code below it is a power of two."""
    from qkern.formats._quantize import dequantize_scales
    from qkern.formats import get_format
    s = dequantize_scales(jnp.array([0, 127, 254, 255], jnp.uint8), None, None, get_format("mxfp4"))
    assert np.isnan(float(s[3])) and float(s[1]) == 1.0 and float(s[2]) == 2.0 ** 127


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("cal", [("fixed", np.inf), ("fixed", np.nan), ("fixed", -np.inf, 1.0),
                                 ("fixed", 0.0, np.inf), ("rms", np.inf), ("rms", np.nan),
                                 ("fixed", "2"), ("fixed", True)],
                         ids=str)
def test_non_finite_or_non_numeric_calibration_is_refused(cal):
    with pytest.raises(ValueError, match="Unknown calibration") as e:
        qkern.quantize(weight(), "int8", calibration=cal)
    assert "finite" in str(e.value)


def test_fixed_calibration_still_takes_numpy_and_jax_scalars():
    a = qkern.quantize(weight(), "int8", calibration=("fixed", np.float32(2.0)))
    b = qkern.quantize(weight(), "int8", calibration=("fixed", 2))
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
