"""A quantised convolution kernel used as users use it: jit, vmap, grad with respect to the
input, lax.scan over stacked kernels, lax.cond, nested quaxify, a transposed kernel, QAT
(fake_quant, also through the serving kernels), rules, and the errors for kernels the
convolution cannot take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

lax = jax.lax
DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN)


def _data(seed=0, c=8, o=8):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, c, o)) * 0.2, jnp.float32)
    return x, w


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.abs(want).max()))


@pytest.mark.parametrize("act_fmt", [None, "int8"])
def test_grad_wrt_input(act_fmt):
    x, w = _data()
    q = qkern.quantize(w, "int8", act_fmt=act_fmt)
    loss = lambda x, q: jnp.sum(jnp.sin(qkern.quaxify(conv)(x, q)))
    got = jax.jit(jax.grad(loss))(x, q)
    # weight-only: exact; W8A8: straight through the activation rounding (the cotangent is
    # the weight-only one, evaluated at the W8A8 output)
    wd = qkern.dequantize(q)
    y = qkern.quaxify(conv)(x, q)
    _, vjp = jax.vjp(lambda x: conv(x, wd), x)
    (want,) = vjp(jnp.cos(y))
    _close(got, want, 1e-4)


def test_vmap_over_inputs():
    x, w = _data(1)
    q = qkern.quantize(w, "nf4")
    xs = jnp.stack([x, 2 * x, -x])
    got = jax.vmap(qkern.quaxify(conv), in_axes=(0, None))(xs, q)
    want = jax.vmap(conv, in_axes=(0, None))(xs, qkern.dequantize(q))
    _close(got, want)


def test_scan_over_stacked_kernels_and_cond():
    rng = np.random.default_rng(2)
    ws = jnp.asarray(rng.standard_normal((3, 3, 3, 8, 8)) * 0.2, jnp.float32)
    qs = qkern.quantize(ws, "int4", block_size=4)           # [layers, kh, kw, I, O], blocks on I
    x, _ = _data(2)

    def net(x, qs, flag):
        def body(h, q):
            h = jnp.tanh(conv(h, q))
            return lax.cond(flag, lambda h: h, lambda h: -h, h), None
        return lax.scan(body, x, qs)[0]

    got = jax.jit(qkern.quaxify(net))(x, qs, True)
    want = net(x, qkern.dequantize(qs), True)
    _close(got, want, 1e-4)
    _close(qkern.quaxify(net)(x, qs, False), net(x, qkern.dequantize(qs), False), 1e-4)


def test_nested_quaxify_and_transposed_kernel():
    x, w = _data(3)
    w_oihw = jnp.transpose(w, (3, 2, 0, 1))
    q = qkern.quantize(w_oihw, "int8", axis=1)               # stored OIHW, blocks along I
    inner = qkern.quaxify(lambda x, q: conv(x, jnp.transpose(q, (2, 3, 1, 0))))
    got = qkern.quaxify(lambda x, q: inner(x, q) + 1.0)(x, q)
    want = conv(x, jnp.transpose(qkern.dequantize(q), (2, 3, 1, 0))) + 1.0
    _close(got, want)


def test_quantised_conv_runs_the_quantised_rule(monkeypatch):
    """The QArray convolution goes through qkern.pallas.qconv (not the materialising
    fallback)."""
    from qkern.types import _qarray_conv
    calls = []
    real = _qarray_conv.qconv
    monkeypatch.setattr(_qarray_conv, "qconv", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = _data(4)
    qkern.quaxify(conv)(x, qkern.quantize(w, "int8"))
    assert calls


@pytest.mark.parametrize("act_fmt", [None, "int8"])
def test_fake_quant_kernels_match_serving(act_fmt):
    x, w = _data(5)
    params = {"conv": {"kernel": w}}
    rules = [qkern.Rule(where=r".*kernel", fmt="int8", act_fmt=act_fmt, min_size=0)]
    model = lambda p, x: conv(x, p["conv"]["kernel"])
    served = qkern.quaxify(model)(qkern.quantize(params, rules=rules), x)
    trained = qkern.quaxify(model)(qkern.fake_quant(params, rules=rules, kernels=True), x)
    np.testing.assert_array_equal(trained, served)
    # straight-through gradient to the float kernel
    g = jax.grad(lambda p: jnp.sum(qkern.quaxify(model)(
        qkern.fake_quant(p, rules=rules, kernels=True), x) ** 2))(params)["conv"]["kernel"]
    wq = qkern.dequantize(qkern.quantize(w, "int8"))
    y = qkern.quaxify(model)(qkern.quantize(params, rules=rules), x)
    _, vjp = jax.vjp(lambda w: conv(x, w), wq)
    _close(g, vjp(2 * y)[0], 1e-4)
    # plain fake_quant: the dense convolution on the round-tripped kernel
    fq = qkern.fake_quant(w, "int4", block_size=4)
    _close(conv(x, fq), conv(x, qkern.dequantize(qkern.quantize(w, "int4", block_size=4))))


def test_rules_select_conv_kernels_by_path():
    x, w = _data(6)
    params = {"stem": {"kernel": w}, "head": {"kernel": w[..., :4]}}
    qp, rep = qkern.quantize(params, rules=[qkern.Rule(where=r"stem/kernel", fmt="nf4",
                                                       min_size=0),
                                            qkern.Rule(fmt=None)], report=True)
    assert isinstance(qp["stem"]["kernel"], qkern.QArray)
    assert not isinstance(qp["head"]["kernel"], qkern.QArray)
    model = lambda p, x: conv(conv(x, p["stem"]["kernel"]), p["head"]["kernel"])
    _close(qkern.quaxify(model)(qp, x), model(qkern.dequantize(qp), x))


# -- errors --------------------------------------------------------------------------------
def test_blocks_along_the_output_features_are_refused():
    x, w = _data(7)
    q = qkern.quantize(w, "int8", axis=-1)                  # O: not contracted
    with pytest.raises(ValueError, match=r"output-feature axis.*axis=2"):
        qkern.quaxify(conv)(x, q)


def test_w8a8_blocks_along_a_spatial_axis_are_refused():
    x, w = _data(8)
    q = qkern.quantize(w, "int8", axis=0, block_size=1, act_fmt="int8")
    with pytest.raises(ValueError, match=r"input-feature axis \(axis 2\)"):
        qkern.quaxify(conv)(x, q)
    # weight-only, the same layout is fine
    qw = qkern.quantize(w, "int8", axis=0, block_size=1)
    _close(qkern.quaxify(conv)(x, qw), conv(x, qkern.dequantize(qw)))
    # one block along kh still has a scale per input feature: refused too (it ran with
    # input feature 0's scale for every feature, 58 % off)
    one = qkern.quantize(w, "int8", axis=0, block_size=w.shape[0], act_fmt="int8")
    assert one.layout.num_blocks == 1 and w.shape[2] > 1
    with pytest.raises(ValueError, match=r"input-feature axis \(axis 2\)"):
        qkern.quaxify(conv)(x, one)


def test_w8a8_depthwise_kernel_with_one_block_along_kh():
    """One input feature per group: a block along kh is one scale per (kw, output feature)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 6))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 12)) * 0.2
    dw = lambda x, w: jax.lax.conv_general_dilated(                      # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6)
    q = qkern.quantize(w, "int8", axis=0, act_fmt="int8")
    got = qkern.quaxify(dw)(x, q)
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    xq = jnp.clip(jnp.round(x / jnp.where(s > 0, s, 1.0)), -127, 127) * s
    _close(got, dw(xq, qkern.dequantize(q)))


def test_gptq_on_a_conv_kernel_says_so():
    _, w = _data(9)
    with pytest.raises(ValueError, match="convolution kernel has no GPTQ path"):
        qkern.quantize(w, "int4", gptq=np.eye(8, dtype=np.float32))
