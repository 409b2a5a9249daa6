"""W8A8 (qkern/pallas/w8a8.py, _xla_w8a8.py): int8 activations times int8 weights, int32
accumulation. The xla path on the shared shapes, the static act_scale, backend selection,
gradients, jit and vmap, bad input. The Triton and Mosaic kernels have their own modules
(test_w8a8_triton.py, test_w8a8_mosaic.py); here they are reached through w8a8_matmul.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.formats import get_format
from qkern.pallas import MatmulConfig, stored_operand
from qkern.pallas.w8a8 import w8a8_matmul
from qkern.pallas._xla_w8a8 import (check_act_scale, quantize_rows, quantize_static,
                                    w8a8_reference, w8a8_xla)

from .cases import DTYPES, SHAPES, assert_matches, make_case, reference_matmul
from .test_w8a8_cases import LAYOUTS, activation, int8_operand

_ref = jax.jit(w8a8_reference)
_INTERPRETED = [("triton", True), ("mosaic_tpu", True)]


@jax.jit
def _xla_and_ref(x, op, s):
    """Dynamic and static scales, the xla path and the reference, in one compile."""
    return w8a8_xla(x, op), w8a8_reference(x, op), w8a8_xla(x, op, s), w8a8_reference(x, op, s)


def _cross():
    """Every layout x every shape, the dtype rotating so each meets every dtype."""
    return [pytest.param(b, s, DTYPES[(i + j) % 3],
                         id=f"{name}-{'x'.join(map(str, s))}-"
                            f"{jnp.dtype(DTYPES[(i + j) % 3]).name}")
            for i, (name, b) in enumerate(LAYOUTS.items()) for j, s in enumerate(SHAPES)]


@pytest.mark.parametrize("block,shape,dtype", _cross())
def test_xla_matches_reference(block, shape, dtype):
    m, k, n = shape
    x, op = activation(m, k, dtype), int8_operand(k, n, block)
    y, want, ys, want_s = _xla_and_ref(x, op, jnp.float32(0.03))
    assert y.dtype == ys.dtype == dtype
    assert_matches(y, want)
    assert_matches(ys, want_s)


def test_xla_chunking_does_not_change_the_result():
    """K chunks of 128 rows (per channel: 8 int32 dots; blocks of 64: 2 per chunk), one
    chunk of everything, and the automatic choice agree with the reference."""
    x = activation(5, 1024, jnp.float32)
    for block in (None, 64):
        op = int8_operand(1024, 72, block)
        want = _ref(x, op)
        for cfg in (MatmulConfig(block_k=128), MatmulConfig(block_k=4096), None):
            assert_matches(w8a8_matmul(x, op, backend="xla", config=cfg), want)


@pytest.mark.parametrize("opts", [dict(block_size=96), dict(axis=None)],
                         ids=["block96", "per-tensor"])
def test_quantized_weights(opts):
    """Operands from qkern.quantize (incl. per-tensor, and a block size that is not a power
    of two): the reference, and close to the weight-only product (activation rounding is
    the only difference)."""
    x, _, op = make_case("int8", opts, 3, 300, 40, jnp.float32)
    y, want, _, _ = _xla_and_ref(x, op, jnp.float32(0.03))
    assert_matches(y, want)
    y_wo = np.asarray(reference_matmul(x, op))
    rel = np.linalg.norm(np.asarray(y) - y_wo) / np.linalg.norm(y_wo)
    assert rel < 0.02


def test_integer_accumulation_is_exact():
    # small integers: every product and sum is exact in int32, so y equals the exact value
    x = jnp.array([[127.0, -127.0, 64.0, 0.0]])
    w = jnp.array([[25.0], [-3.0], [50.0], [127.0]]) * 0.5   # codes 25, -3, 50, 127 exactly
    op = stored_operand(qkern.quantize(w, "int8"))
    np.testing.assert_allclose(w8a8_matmul(x, op), x @ w, rtol=1e-6)
    # static scale 1: x is already integral, so the codes are x itself
    np.testing.assert_allclose(w8a8_matmul(x, op, act_scale=1.0), x @ w, rtol=1e-6)


def test_row_quantisation_zero_rows():
    q, s = quantize_rows(jnp.zeros((2, 8)))
    assert not np.any(np.isnan(np.asarray(s))) and np.all(np.asarray(q) == 0)


def test_static_quantisation_is_clip_round_divide():
    x = jnp.array([[0.1, -0.26, 3.0, -100.0, 0.05]], jnp.float32)
    q, s = quantize_static(x, jnp.float32(0.1))
    np.testing.assert_array_equal(q, np.clip(np.round(np.asarray(x) / np.float32(0.1)),
                                             -127, 127).astype(np.int8))
    np.testing.assert_array_equal(s, [[np.float32(0.1)]])
    assert q.dtype == jnp.int8
    # a zero scale gives zeros, not NaN
    op = int8_operand(64, 16)
    y = w8a8_matmul(jnp.ones((2, 64)), op, act_scale=0.0)
    np.testing.assert_array_equal(y, np.zeros((2, 16), np.float32))


def test_static_scale_saturates_and_differs_from_dynamic():
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
    big = jnp.float32(1.0)                      # |x| < ~4: codes in [-4, 4], coarse
    y_static = w8a8_matmul(x, op, act_scale=big)
    xq = jnp.clip(jnp.round(x), -127, 127)
    np.testing.assert_allclose(y_static, reference_matmul(xq, op), rtol=2e-5, atol=2e-4)
    assert not np.allclose(y_static, w8a8_matmul(x, op), rtol=1e-2)


@pytest.mark.parametrize("backend,interpret", _INTERPRETED, ids=["triton", "mosaic_tpu"])
def test_static_scale_on_pallas_backends(backend, interpret):
    """act_scale through w8a8_matmul on the interpreted kernels (one small case each;
    the kernel modules test the layouts)."""
    x, op = activation(3, 256, jnp.bfloat16), int8_operand(256, 136)
    s = jnp.float32(0.025)
    y = w8a8_matmul(x, op, act_scale=s, backend=backend, interpret=interpret)
    assert y.dtype == jnp.bfloat16
    assert_matches(y, _ref(x, op, s))


def _traced(op, x, **kw) -> str:
    """The jaxpr of a fresh function (make_jaxpr caches traces per function object, and
    the backend is read at trace time)."""
    return str(jax.make_jaxpr(lambda x: w8a8_matmul(x, op, **kw))(x))


def test_backend_selection(monkeypatch):
    """Argument > qkern.backend(...) > QKERN_BACKEND > device; seen in the traced jaxpr."""
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
    assert "pallas_call" not in _traced(op, x)                      # CPU: xla
    with qkern.backend("triton", interpret=True):
        assert "w8a8_triton_decode" in _traced(op, x)
        assert "w8a8_mosaic_decode" in _traced(op, x, backend="mosaic_tpu")
    monkeypatch.setenv("QKERN_BACKEND", "mosaic_tpu")
    assert "w8a8_mosaic_decode" in _traced(op, x)
    assert "w8a8_triton_tiled" in _traced(op, jnp.ones((40, 256)), backend="triton")
    with qkern.backend("xla"):
        assert "pallas_call" not in _traced(op, x)


@pytest.mark.parametrize("act_scale", [None, 0.05], ids=["dynamic", "static"])
def test_grad_is_straight_through(act_scale):
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
    g = jax.jit(jax.grad(lambda x: jnp.sum(w8a8_matmul(x, op, act_scale=act_scale) ** 2)))(x)
    y = w8a8_matmul(x, op, act_scale=act_scale)
    g_ref = jax.vjp(lambda x: reference_matmul(x, op), x)[1](2 * y)[0]
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_grad_on_interpreted_backend_uses_its_transposed_kernel():
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64, 128)
    f = lambda x: jnp.sum(w8a8_matmul(x, op, backend="triton", interpret=True))
    jaxpr = str(jax.make_jaxpr(jax.grad(f))(x))
    assert "qmatmul_t_triton" in jaxpr and "w8a8_triton" in jaxpr
    g_ref = jax.grad(lambda x: jnp.sum(reference_matmul(x, op)))(x)
    np.testing.assert_allclose(jax.grad(f)(x), g_ref, rtol=1e-4, atol=1e-4)


def test_grads_of_weight_and_act_scale_are_zero():
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
    gx, gop, gs = jax.grad(
        lambda x, op, s: jnp.sum(w8a8_matmul(x, op, act_scale=s)), argnums=(0, 1, 2),
        allow_int=True)(x, op, jnp.float32(0.05))
    assert gs.shape == () and float(gs) == 0.0
    assert float(jnp.max(jnp.abs(gop.scales))) == 0.0
    assert float(jnp.max(jnp.abs(gx))) > 0
    # a bfloat16 act_scale gets a bfloat16 zero
    gs = jax.grad(lambda s: jnp.sum(w8a8_matmul(x, op, act_scale=s)))(jnp.bfloat16(0.05))
    assert gs.dtype == jnp.bfloat16 and float(gs) == 0.0


def test_jit_and_vmap():
    x, op = activation(3, 256, jnp.bfloat16), int8_operand(256, 64, 128)
    xs = jnp.stack([x, -2 * x])
    scales = jnp.array([0.02, 0.04], jnp.float32)
    # leading dims of x flatten into M; vmap over x and over the static scale
    f = jax.jit(jax.vmap(lambda x, s, op: w8a8_matmul(x, op, act_scale=s),
                         in_axes=(0, 0, None)))
    ys = f(xs, scales, op)
    for b in range(2):
        assert_matches(ys[b], _ref(xs[b], op, scales[b]))
    y3 = jax.jit(lambda x, op: w8a8_matmul(x, op))(xs, op)          # [2, 3, K] -> [2, 3, N]
    assert y3.shape == (2, 3, 64)
    assert_matches(y3.reshape(6, 64), _ref(xs.reshape(6, 256), op))


def test_act_scale_traced_under_jit():
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
    f = jax.jit(lambda x, s: w8a8_matmul(x, op, act_scale=s))
    assert_matches(f(x, jnp.float32(0.05)), _ref(x, op, jnp.float32(0.05)))


# ---------------------------------------------------------------------------- bad input


def test_rejects_non_int8_weights():
    op = int8_operand(256, 64, 128)
    int4 = dataclasses.replace(op, data=op.data[:128].astype(jnp.uint8),
                               fmt=get_format("int4"))
    with pytest.raises(ValueError, match="symmetric int8 weight; got int4"):
        w8a8_matmul(jnp.ones((1, 256)), int4)
    minmax = dataclasses.replace(op, zeros=jnp.zeros(op.scales.shape, jnp.int8))
    for backend in ("xla", "triton", "mosaic_tpu"):
        with pytest.raises(ValueError, match="got int8 with zero points"):
            w8a8_matmul(jnp.ones((1, 256)), minmax, backend=backend, interpret=True)
    with pytest.raises(ValueError, match="int8 weight codes; got data of dtype int32"):
        w8a8_matmul(jnp.ones((1, 256)), dataclasses.replace(op, data=op.data.astype(jnp.int32)))
    with pytest.raises(TypeError, match="QOperand"):
        w8a8_matmul(jnp.ones((1, 256)), jnp.ones((256, 64), jnp.int8))


def test_rejects_wrong_k_and_non_float_x():
    op = int8_operand(256, 64)
    with pytest.raises(ValueError, match=r"x has 255 columns but the weight's K is 256"):
        w8a8_matmul(jnp.ones((2, 255)), op)
    for backend in ("triton", "mosaic_tpu"):
        with pytest.raises(ValueError, match=r"K is 256"):
            w8a8_matmul(jnp.ones((2, 3, 255)), op, backend=backend, interpret=True)
    with pytest.raises(ValueError, match="floating point"):
        w8a8_matmul(jnp.ones((2, 256), jnp.int32), op)


@pytest.mark.parametrize("bad,err,match", [
    (jnp.ones((1,), jnp.float32), ValueError, r"scalar .* got shape \(1,\)"),
    (jnp.ones((2, 3), jnp.float32), ValueError, r"got shape \(2, 3\)"),
    (jnp.int32(2), TypeError, r"floating-point scalar; got dtype int32"),
    ("0.1", TypeError, r"scalar float array or None; got str"),
    (True, TypeError, r"bool"),
])
def test_rejects_non_scalar_act_scale(bad, err, match):
    op = int8_operand(256, 64)
    for backend in ("xla", "triton", "mosaic_tpu"):
        with pytest.raises(err, match=match):
            w8a8_matmul(jnp.ones((1, 256)), op, act_scale=bad, backend=backend,
                        interpret=True)


def test_check_act_scale_accepts_python_numbers():
    s = check_act_scale(0.5)
    assert s.shape == () and s.dtype == jnp.float32
    assert check_act_scale(None) is None
    assert check_act_scale(jnp.float16(2.0)).dtype == jnp.float32


@pytest.mark.parametrize("backend", ["xla", "triton", "mosaic_tpu"])
def test_no_rows(backend):
    """M = 0 (an empty batch) gives an empty result instead of a zero-row pallas grid."""
    y = w8a8_matmul(jnp.ones((0, 4, 256), jnp.bfloat16), int8_operand(256, 64),
                    backend=backend, interpret=True)
    assert y.shape == (0, 4, 64) and y.dtype == jnp.bfloat16
