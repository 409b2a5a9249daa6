"""Bad input: ValueError / TypeError with messages that name what is wrong."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import qkern

W = np.ones((64, 8), np.float32)


@pytest.mark.parametrize("fmt", ["int9", "nf5", "fp8", "INT8", "", "int0"])
def test_unknown_format(fmt):
    with pytest.raises(ValueError, match="format") as e:
        qkern.quantize(W, fmt)
    assert repr(fmt) in str(e.value)
    assert "int8" in str(e.value) and "nf4" in str(e.value)   # lists the choices


def test_unknown_format_in_pytree_form():
    with pytest.raises(ValueError, match="int9"):
        qkern.quantize({"a": np.ones((64, 64), np.float32)}, "int9")


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_, np.complex64])
def test_non_floating_array(dtype):
    with pytest.raises(TypeError) as e:
        qkern.quantize(np.ones((64, 8), dtype), "int8")
    assert np.dtype(dtype).name in str(e.value)
    assert "float" in str(e.value)


def test_non_floating_jax_array():
    with pytest.raises(TypeError, match="int32"):
        qkern.quantize(jnp.ones((64, 8), jnp.int32), "nf4")


@pytest.mark.parametrize("fmt,block", [("int8", 65), ("int4", 66), ("nf4", 128), ("fp8_e4m3", 100)])
def test_block_size_larger_than_axis(fmt, block):
    with pytest.raises(ValueError) as e:
        qkern.quantize(W, fmt, block_size=block)
    msg = str(e.value)
    assert "block_size" in msg and str(block) in msg
    assert "(64, 8)" in msg or "64" in msg


def test_block_size_larger_than_chosen_axis():
    w = np.ones((128, 10), np.float32)
    qkern.quantize(w, "int8", block_size=100, axis=0)      # fine along axis 0
    with pytest.raises(ValueError, match="block_size"):
        qkern.quantize(w, "int8", block_size=100, axis=-1)  # axis 1 has length 10


@pytest.mark.parametrize("block", [0, -4])
def test_block_size_not_positive(block):
    with pytest.raises(ValueError, match="block_size"):
        qkern.quantize(W, "int8", block_size=block)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "fp4"])
@pytest.mark.parametrize("block", [15, 33])
def test_odd_block_size_for_4bit_formats(fmt, block):
    with pytest.raises(ValueError) as e:
        qkern.quantize(W, fmt, block_size=block)
    msg = str(e.value)
    assert fmt in msg and str(block) in msg and "even" in msg


@pytest.mark.parametrize("fmt", ["int8", "int3", "fp8_e4m3"])
def test_odd_block_size_fine_for_unpacked_formats(fmt):
    qw = qkern.quantize(W, fmt, block_size=15)
    assert qw.block_size == 15 and qw.shape == (64, 8)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("block", [16, 64, 33])
def test_mx_block_size_must_be_32(fmt, block):
    with pytest.raises(ValueError) as e:
        qkern.quantize(W, fmt, block_size=block)
    assert "32" in str(e.value) and fmt in str(e.value)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_block_size_32_accepted(fmt):
    assert qkern.quantize(W, fmt, block_size=32).block_size == 32


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "mxfp4", "mxfp8"])
def test_minmax_on_non_integer_formats(fmt):
    with pytest.raises(ValueError) as e:
        qkern.quantize(W, fmt, calibration="minmax")
    assert "minmax" in str(e.value) and fmt in str(e.value)


@pytest.mark.parametrize("cal", ["percentile", "max", None, 3.0, ("fixed",), ("fixed", 2.0, 1.0),
                                 ("fixed", -1.0), ("rms", 0.0), ("rms", -1.0), ("mse", 1.0),
                                 ["fixed", 1.0], ("fixed", 1.0, 2.0, 3.0)])
def test_unknown_calibration(cal):
    with pytest.raises(ValueError) as e:
        qkern.quantize(W, "int8", calibration=cal)
    assert "calibration" in str(e.value).lower()


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError) as e:
        qkern.quantize(W, "int8", axis=axis)
    assert str(axis) in str(e.value) and "(64, 8)" in str(e.value)


def test_axis_out_of_range_rank1():
    with pytest.raises(ValueError, match="axis"):
        qkern.quantize(np.ones(16, np.float32), "int8", axis=1)


@pytest.mark.parametrize("where", [r".*", lambda path, leaf: True])
def test_where_on_a_single_array(where):
    for x in (W, jnp.asarray(W)):
        with pytest.raises(TypeError, match="where"):
            qkern.quantize(x, "int8", where=where)


def test_where_of_a_wrong_type():
    with pytest.raises(TypeError, match="where"):
        qkern.quantize({"a": np.ones((64, 64), np.float32)}, "int8", where=3)


def test_scalar_array():
    with pytest.raises(ValueError, match="scalar|rank"):
        qkern.quantize(np.array(1.0, np.float32), "int8")


def test_empty_axis():
    with pytest.raises(ValueError, match=r"\(0, 4\)"):
        qkern.quantize(np.ones((0, 4), np.float32), "int8")


def test_already_quantised():
    qw = qkern.quantize(W, "int8")
    with pytest.raises(TypeError, match="already quantised"):
        qkern.quantize(qw, "int4")


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_per_tensor_rejected(fmt):
    with pytest.raises(ValueError, match=fmt):
        qkern.quantize(W, fmt, axis=None)


@pytest.mark.parametrize("cal", ["rms", ("fixed", 1.0)])
def test_mx_calibration_other_than_absmax_rejected(cal):
    with pytest.raises(ValueError, match="mxfp4"):
        qkern.quantize(W, "mxfp4", calibration=cal)


@pytest.mark.parametrize("fmt,cal", [("mxfp8", "absmax"), ("int4", "minmax")])
def test_double_quant_where_it_does_not_apply(fmt, cal):
    with pytest.raises(ValueError, match="double_quant"):
        qkern.quantize(W, fmt, calibration=cal, double_quant=True)


def test_pytree_error_names_the_leaf():
    tree = {"layers": [{"kernel": np.ones((64, 32), np.float32)}]}
    with pytest.raises(ValueError) as e:
        qkern.quantize(tree, "int8", block_size=100)
    assert "layers/0/kernel" in str(e.value) and "block_size" in str(e.value)


@pytest.mark.parametrize("axis", [1.0, "0", True, np.float32(0), (0,)], ids=repr)
def test_axis_must_be_an_int(axis):
    """axis=1.0 or "0" used to fail deep inside ("tuple indices must be integers")."""
    for call in (lambda: qkern.quantize(W, "int8", axis=axis),
                 lambda: qkern.quantize(W, "int4", axis=axis, gptq=np.eye(64, dtype=np.float32)),
                 lambda: qkern.fake_quant(W, "nf4", axis=axis)):
        with pytest.raises(TypeError, match=r"axis must be an int .*or None") as e:
            call()
        assert repr(axis) in str(e.value)


def test_axis_numpy_int_is_accepted():
    a = qkern.quantize(W, "int8", axis=np.int64(0))
    assert a.block_axis == 0


def test_block_size_with_per_tensor_is_an_error():
    with pytest.raises(ValueError, match="block_size=32 with axis=None"):
        qkern.quantize(jnp.ones((64, 32)), "int8", axis=None, block_size=32)
    with pytest.raises(ValueError, match="block_size=32 with axis=None"):
        qkern.Rule(where=".*", fmt="int8", axis=None, block_size=32)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_scale_dtype_does_not_apply_to_mx(fmt):
    with pytest.raises(ValueError, match="E8M0.*scale_dtype=bfloat16 does not apply"):
        qkern.quantize(jnp.ones((64, 32)), fmt, scale_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="scale_dtype=bfloat16 does not apply"):
        qkern.Rule(where=".*", fmt=fmt, scale_dtype=jnp.bfloat16)


@pytest.mark.parametrize("fmt, big", [("int8", 1e7), ("nf4", 1e5)])
def test_a_scale_float16_cannot_hold_is_refused_never_inf(fmt, big):
    """Block scales above float16's 65504 (|w| > 65504 * the format's largest code):
    eager quantise refuses; under jit those blocks (only) dequantise to NaN."""
    import jax
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 16)), jnp.float32)
    w = w.at[:, 3].multiply(big)
    with pytest.raises(ValueError, match="scale above 65504, the largest float16"):
        qkern.quantize(w, fmt, scale_dtype=jnp.float16)
    d = np.asarray(qkern.dequantize(jax.jit(
        lambda w: qkern.quantize(w, fmt, scale_dtype=jnp.float16))(w)))
    assert np.isnan(d[:, 3]).all() and np.isfinite(np.delete(d, 3, axis=1)).all()
    qkern.quantize(w, fmt, scale_dtype=jnp.bfloat16)               # bfloat16 holds it


def test_minmax_near_the_float32_maximum_stays_finite():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((128, 8)), jnp.float32)
    w = w.at[0].set(3e38).at[1].set(-3e38)
    d = qkern.dequantize(qkern.quantize(w, "int4", calibration="minmax"))
    assert np.isfinite(np.asarray(d)).all()
    np.testing.assert_allclose(d[:2], w[:2], rtol=0, atol=6e38 / 15 / 2 * 1.01)   # half a step
