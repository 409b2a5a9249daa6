"""Quantised convolutions against `lax.conv_general_dilated` on the dequantised kernel:
1-D, 2-D and 3-D, NHWC and NCHW, strides, SAME/VALID/explicit padding, both dilations,
feature groups (depthwise and grouped), every weight format, float32 and bfloat16; the
piecewise dequantisation of large kernels; W8A8 against an independent per-pixel
reference, dynamic and calibrated."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas.qconv import _xla

lax = jax.lax

# name: (x shape, kernel shape, conv kwargs, quantise axis)
CASES = {
    "1d_nwc_stride2_same": ((2, 11, 6), (3, 6, 8),
                            dict(window_strides=(2,), padding="SAME",
                                 dimension_numbers=("NWC", "WIO", "NWC")), -2),
    "2d_nhwc_same": ((2, 7, 9, 8), (3, 3, 8, 12),
                     dict(window_strides=(1, 1), padding="SAME",
                          dimension_numbers=("NHWC", "HWIO", "NHWC")), -2),
    "2d_nchw_oihw_valid_stride": ((2, 8, 9, 7), (12, 8, 3, 2),
                                  dict(window_strides=(2, 1), padding="VALID",
                                       dimension_numbers=("NCHW", "OIHW", "NCHW")), 1),
    "2d_explicit_pad_rhs_dilation": ((1, 10, 9, 8), (3, 2, 8, 5),
                                     dict(window_strides=(1, 2), padding=((1, 2), (0, 1)),
                                          rhs_dilation=(2, 1),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")), -2),
    "2d_lhs_dilation": ((2, 5, 5, 8), (3, 3, 8, 6),
                        dict(window_strides=(1, 1), padding=((2, 2), (1, 2)), lhs_dilation=(2, 2),
                             dimension_numbers=("NHWC", "HWIO", "NHWC")), -2),
    "2d_depthwise": ((2, 8, 8, 6), (3, 3, 1, 12),
                     dict(window_strides=(1, 1), padding="SAME", feature_group_count=6,
                          dimension_numbers=("NHWC", "HWIO", "NHWC")), 0),
    "2d_grouped": ((2, 6, 7, 8), (3, 3, 4, 10),
                   dict(window_strides=(1, 1), padding="SAME", feature_group_count=2,
                        dimension_numbers=("NHWC", "HWIO", "NHWC")), -2),
    "3d_ndhwc": ((1, 5, 6, 4, 8), (2, 3, 2, 8, 6),
                 dict(window_strides=(1, 2, 1), padding="SAME",
                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), -2),
}
FORMATS = ["int8", "int4", "nf4", "fp8_e4m3"]


def _arrays(case, dtype, seed=0):
    xs, ws, kw, axis = CASES[case]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    w = jnp.asarray(rng.standard_normal(ws) * 0.2, dtype)
    return x, w, kw, axis


def _conv(kw):
    return lambda x, w: lax.conv_general_dilated(x, w, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dense_conv_of_dequantised_kernel(case, fmt, dtype):
    x, w, kw, axis = _arrays(case, dtype)
    q = qkern.quantize(w, fmt, axis=axis)
    conv = _conv(kw)
    got = jax.jit(qkern.quaxify(conv))(x, q)
    want = conv(x, qkern.dequantize(q))
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_mx_kernels_match_dense(fmt, layout):
    """MX scales (E8M0 bytes) are decoded once: decoding the decoded float scales again
    read 0.25 as the exponent byte 0 and every MX convolution returned zeros."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 64) if layout == "NHWC" else (2, 64, 6, 6)),
                    jnp.float32)
    spec = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 16) if layout == "NHWC" else (16, 64, 3, 3)),
                    jnp.float32)
    q = qkern.quantize(w, fmt, axis=2 if layout == "NHWC" else 1)
    conv = _conv(dict(window_strides=(1, 1), padding="SAME", dimension_numbers=spec))
    want = conv(x, qkern.dequantize(q))
    got = jax.jit(qkern.quaxify(conv))(x, q)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    gx = jax.grad(lambda x: jnp.sum(qkern.quaxify(conv)(x, q) ** 2))(x)
    np.testing.assert_allclose(gx, jax.grad(lambda x: jnp.sum(conv(x, qkern.dequantize(q)) ** 2))(x),
                               rtol=1e-4, atol=1e-4 * float(jnp.abs(gx).max()))


def test_quantised_differs_from_float_kernel():
    """The comparison above can fail: the quantised result is not the float kernel's."""
    x, w, kw, axis = _arrays("2d_nhwc_same", jnp.float32)
    conv = _conv(kw)
    got = qkern.quaxify(conv)(x, qkern.quantize(w, "int4", axis=axis))
    assert float(jnp.abs(got - conv(x, w)).max()) > 1e-3


def _count_convs(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)
    n = 0

    def walk(j):
        nonlocal n
        for e in j.eqns:
            n += e.primitive.name == "conv_general_dilated"
            for v in e.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)
    walk(jaxpr.jaxpr)
    return n


@pytest.mark.parametrize("case,pieces", [("2d_nhwc_same", 2), ("2d_grouped", 2),
                                         ("2d_depthwise", 6), ("1d_nwc_stride2_same", 1)])
def test_large_kernels_dequantise_piece_by_piece(monkeypatch, case, pieces):
    """A kernel larger than CHUNK_BYTES runs as several convolutions over whole feature
    groups (never the whole kernel dequantised at once), with the same result."""
    x, w, kw, axis = _arrays(case, jnp.float32, seed=3)
    x = jnp.concatenate([x, x[:1]], axis=0)       # a shape no other test traced
    q = qkern.quantize(w, "int8", axis=axis)
    dense_bytes = w.size * 4
    monkeypatch.setattr(_xla, "CHUNK_BYTES", -(-dense_bytes // pieces) if pieces > 1 else dense_bytes)
    conv = _conv(kw)
    f = qkern.quaxify(conv)
    plan_convs = _count_convs(f, x, q)
    assert plan_convs >= pieces, (plan_convs, pieces)
    want = conv(x, qkern.dequantize(q))
    np.testing.assert_allclose(f(x, q), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_chunk_plan_covers_outputs_in_whole_groups():
    from qkern.pallas.qconv.base import ConvOperand
    from qkern.formats import Layout, get_format
    lay = Layout((3, 3, 4, 30), 2, 4, False)
    op = ConvOperand(None, None, None, get_format("int8"), lay)
    dn = lax.conv_dimension_numbers((1, 1, 1, 12), lay.shape, ("NHWC", "HWIO", "NHWC"))
    for groups in (1, 3, 5):
        params = dict(dimension_numbers=dn, feature_group_count=groups, batch_group_count=1)
        old = _xla.CHUNK_BYTES
        try:
            _xla.CHUNK_BYTES = 3 * 3 * 4 * 7 * 4
            plan = _xla.chunk_plan(op, params, 4)
        finally:
            _xla.CHUNK_BYTES = old
        assert plan[0][0] == 0 and plan[-1][1] == 30 and len(plan) > 1
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        unit = 30 // groups if groups > 1 else 8          # whole groups; else 8 features
        assert all(s % unit == 0 for s, _ in plan), plan


# -- W8A8 ----------------------------------------------------------------------------------
def _w8a8_reference(x, q, kw, act_scale=None):
    """x quantised to int8 per pixel (absmax over its feature axis) or with one static
    scale, dequantised, convolved with the dequantised kernel in float32."""
    feat = kw["dimension_numbers"][0].index("C")
    x = x.astype(jnp.float32)
    s = (jnp.max(jnp.abs(x), axis=feat, keepdims=True) / 127.0 if act_scale is None
         else jnp.float32(act_scale))
    xq = jnp.clip(jnp.round(x / jnp.where(s > 0, s, 1.0)), -127, 127)
    return lax.conv_general_dilated(xq * s, qkern.dequantize(q).astype(jnp.float32), **kw)


W8A8_CASES = ["1d_nwc_stride2_same", "2d_nhwc_same", "2d_nchw_oihw_valid_stride",
              "2d_explicit_pad_rhs_dilation", "2d_lhs_dilation", "2d_grouped", "3d_ndhwc"]


@pytest.mark.parametrize("block_size", [None, 4], ids=["per_channel", "blocks_of_4"])
@pytest.mark.parametrize("case", W8A8_CASES)
def test_w8a8_matches_per_pixel_reference(case, block_size):
    x, w, kw, axis = _arrays(case, jnp.float32, seed=1)
    q = qkern.quantize(w, "int8", axis=axis, block_size=block_size, act_fmt="int8")
    got = jax.jit(qkern.quaxify(_conv(kw)))(x, q)
    want = _w8a8_reference(x, q, kw)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    # and it is a quantised-activation result: not the weight-only one
    weight_only = _conv(kw)(x, qkern.dequantize(q))
    assert float(jnp.abs(got - weight_only).max()) > 1e-6 * scale


def test_w8a8_static_scale_and_bf16():
    x, w, kw, axis = _arrays("2d_nhwc_same", jnp.float32, seed=2)
    q = qkern.quantize(w, "int8", act_fmt="int8")
    q = dataclasses.replace(q, act_scale=jnp.float32(0.01))        # values past 1.27 saturate
    got = qkern.quaxify(_conv(kw))(x, q)
    want = _w8a8_reference(x, q, kw, act_scale=0.01)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # bf16 x needs a bf16 kernel, as in dense JAX; W8A8 accumulates in int32 either way
    x16 = x.astype(jnp.bfloat16)
    got16 = qkern.quaxify(lambda x, w: _conv(kw)(x, w.astype(jnp.bfloat16)))(x16, q)
    assert got16.dtype == jnp.bfloat16
    want16 = _w8a8_reference(x16, q, kw, 0.01)
    np.testing.assert_allclose(np.asarray(got16, np.float32), want16, rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(want16).max()))
    with pytest.raises(TypeError, match="same dtypes"):      # as dense JAX says
        qkern.quaxify(_conv(kw))(x16, q)


def test_calibrate_records_conv_input_scale():
    x, w, kw, axis = _arrays("2d_nhwc_same", jnp.float32, seed=4)
    params = {"conv": {"kernel": w}}
    q = qkern.quantize(params, rules=[qkern.Rule(where=r".*kernel", fmt="int8", act_fmt="int8",
                                                 min_size=0)])
    model = lambda p, batch: lax.conv_general_dilated(batch, p["conv"]["kernel"], **kw)
    batches = [x, 2 * x]
    cal = qkern.calibrate(model, q, batches)
    s = cal["conv"]["kernel"].act_scale          # one scale, broadcast over leading axes
    np.testing.assert_allclose(s, float(jnp.abs(2 * x).max()) / 127.0, rtol=1e-6)
    s = jnp.ravel(s)[0]
    got = qkern.quaxify(model)(cal, x)
    np.testing.assert_allclose(got, _w8a8_reference(x, cal["conv"]["kernel"], kw, float(s)),
                               rtol=1e-4, atol=1e-4)
