"""act_fmt="int8" in a rule: W8A8 under quaxify, dynamic per-row scales or static scales
from qkern.calibrate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

rng = np.random.default_rng(1)


def _w(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


W8A8 = [qkern.Rule(where=r".*w[12]", fmt="int8", act_fmt="int8", min_size=1),
        qkern.Rule(where=r".*w3", fmt="int8", min_size=1)]           # weight-only


def model(p, x):
    h = jax.nn.relu(x @ p["w1"])
    h = jax.nn.relu(h @ p["w2"])
    return h @ p["w3"]


def params():
    return {"w1": _w(64, 128) / 8, "w2": _w(128, 128) / 11, "w3": _w(128, 32) / 11}


def _int8(x, s):
    """x quantised to int8 with scale(s) s and dequantised: the W8A8 meaning."""
    return jnp.clip(jnp.round(x / s), -127, 127) * s


def _reference(q, x, static):
    """The same model in plain jnp: activations rounded to int8 (per row, or by the static
    scale), weights dequantised, float32 dots at highest precision."""
    hi = jax.lax.Precision.HIGHEST

    def act(name, h):
        s = q[name].act_scale if static else jnp.max(jnp.abs(h), axis=-1, keepdims=True) / 127
        return _int8(h, s)

    w = qkern.dequantize(q)
    h = jax.nn.relu(jnp.dot(act("w1", x), w["w1"], precision=hi))
    h = jax.nn.relu(jnp.dot(act("w2", h), w["w2"], precision=hi))
    return jnp.dot(h, w["w3"], precision=hi)


def test_rule_sets_act_fmt_and_report_says_so():
    q, rep = qkern.quantize(params(), rules=W8A8, report=True)
    assert q["w1"].act_fmt == "int8" and q["w3"].act_fmt is None
    assert q["w1"].act_scale is None
    assert "act int8" in rep["w1"].note and "act" not in rep["w3"].note
    assert "act_fmt=int8" in repr(q["w1"])


def test_dynamic_w8a8_under_quaxify_matches_per_row_reference():
    q = qkern.quantize(params(), rules=W8A8)
    x = _w(5, 64)
    got = qkern.quaxify(model)(q, x)
    want = _reference(q, x, static=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # it really quantised the activations: weight-only differs by more than rounding noise
    weight_only = qkern.quaxify(model)(qkern.quantize(params(), "int8", min_size=1), x)
    assert float(jnp.abs(weight_only - got).max()) > 1e-3


def test_w8a8_routes_to_the_w8a8_kernel(monkeypatch):
    from qkern.types import _qarray_matmul as routing
    calls = []
    real = routing.w8a8_matmul
    monkeypatch.setattr(routing, "w8a8_matmul",
                        lambda x, op, **kw: calls.append(kw) or real(x, op, **kw))
    q = qkern.quantize(params(), rules=W8A8)
    jax.block_until_ready(qkern.quaxify(model)(q, _w(3, 64)))
    assert len(calls) == 2                                 # w1 and w2; w3 is weight-only
    # x @ W.T has no W8A8 kernel: it runs weight-only, correctly
    calls.clear()
    x = _w(3, 128)
    y = qkern.quaxify(lambda w, x: x @ w.T)(q["w2"], x)
    assert calls == []
    np.testing.assert_allclose(y, x @ qkern.dequantize(q["w2"]).T, rtol=1e-5, atol=1e-5)


def test_calibrate_records_absmax_and_serves_static_scales():
    p = params()
    q = qkern.quantize(p, rules=W8A8)
    batches = [_w(4, 64) for _ in range(3)]
    cal = qkern.calibrate(model, q, batches)
    # the scale is the largest activation any batch fed each layer, / 127
    x_all = jnp.concatenate(batches)
    deq = qkern.dequantize(q)
    h1 = jax.nn.relu(x_all @ deq["w1"])
    np.testing.assert_allclose(cal["w1"].act_scale, jnp.abs(x_all).max() / 127, rtol=1e-6)
    np.testing.assert_allclose(cal["w2"].act_scale, jnp.abs(h1).max() / 127, rtol=1e-4)
    assert cal["w1"].act_scale.dtype == jnp.float32 and cal["w1"].act_scale.shape == ()
    assert cal["w3"].act_scale is None                     # weight-only: nothing to calibrate
    assert type(cal["w1"]) is qkern.QArray
    np.testing.assert_array_equal(cal["w1"].data, q["w1"].data)

    x = _w(6, 64)
    got = jax.jit(qkern.quaxify(model))(cal, x)
    np.testing.assert_allclose(got, _reference(cal, x, static=True), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, qkern.quaxify(model)(q, x), rtol=1e-6, atol=1e-6)  # static != dynamic


def test_calibrate_through_jit_scan_and_vmap_inside_the_model():
    p = {"w": jnp.stack([_w(32, 32) / 6, _w(32, 32) / 6])}
    q = qkern.quantize(p, rules=[qkern.Rule(r"w", "int8", act_fmt="int8", axis=-2, min_size=1)])

    def scanned(p, x):
        def body(h, w):
            return jax.nn.relu(h @ w), None
        return jax.lax.scan(body, x, p["w"])[0]

    fn = jax.jit(lambda p, b: jax.vmap(lambda x: scanned(p, x))(b))
    x = _w(3, 32)
    cal = qkern.calibrate(fn, q, [x])
    # one scale for the stack (the largest activation either layer saw), one copy per layer
    s = cal["w"].act_scale
    assert s.shape == (2,) and s[0] == s[1]
    w = qkern.dequantize(q)["w"]
    h1 = jax.nn.relu(x @ w[0])
    np.testing.assert_allclose(s[0], max(jnp.abs(x).max(), jnp.abs(h1).max()) / 127, rtol=1e-4)
    # serving: scan hands each step one layer's QArray, which runs W8A8 with the static scale
    got = qkern.quaxify(fn)(cal, x)
    hi = jax.lax.Precision.HIGHEST
    want = x
    for i in range(2):
        want = jax.nn.relu(jnp.dot(jnp.clip(jnp.round(want / s[i]), -127, 127) * s[i], w[i],
                                   precision=hi))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_calibrate_warns_for_unreached_layers_and_rejects_bad_input():
    q = qkern.quantize(params(), rules=W8A8)
    with pytest.warns(UserWarning, match="w2"):
        cal = qkern.calibrate(lambda p, x: x @ p["w1"], q, [_w(2, 64)])
    assert cal["w2"].act_scale is None and cal["w1"].act_scale is not None
    with pytest.raises(ValueError, match="act_fmt='int8'"):
        qkern.calibrate(model, qkern.quantize(params(), "int8"), [_w(2, 64)])
    with pytest.raises(ValueError, match="empty"):
        qkern.calibrate(model, q, [])
    for margin in (0.0, -1.0, float("nan"), float("inf")):   # NaN/inf scales: all-NaN outputs
        with pytest.raises(ValueError, match="margin must be a finite positive number"):
            qkern.calibrate(model, q, [_w(2, 64)], margin=margin)


def test_calibration_sessions_do_not_share_jit_caches():
    q = qkern.quantize(params(), rules=W8A8)
    fn = jax.jit(model)
    small = qkern.calibrate(fn, q, [_w(2, 64) * 0.1])
    big = qkern.calibrate(fn, q, [_w(2, 64) * 10])
    assert float(big["w1"].act_scale) > 20 * float(small["w1"].act_scale)


def test_w8a8_rounds_x_wherever_vmap_sits_and_under_a_lora_adapter():
    """A batched dot_general (vmap inside quaxify) has no kernel and runs dense, and a
    LoRA adapter on a W8A8 base skips the fused QLoRA kernel: both still round x as the
    W8A8 kernel does (they ran weight-only before), so where vmap sits or whether an
    adapter wraps the weight never changes the numerics."""
    ws, xs = _w(3, 64, 32) / 8, _w(3, 5, 64)
    qs = qkern.quantize(ws, "int8", act_fmt="int8")
    mm = lambda x, w: x @ w                                              # noqa: E731
    outside = jax.jit(jax.vmap(qkern.quaxify(mm)))(xs, qs)               # 2-D: the kernel
    inside = jax.jit(qkern.quaxify(jax.vmap(mm)))(xs, qs)                # batched: dense
    s = jnp.max(jnp.abs(xs), axis=-1, keepdims=True) / 127.0
    want = jnp.einsum("bmk,bkn->bmn", _int8(xs, s), qkern.dequantize(qs))
    np.testing.assert_allclose(inside, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outside, inside, rtol=1e-4, atol=1e-5)
    weight_only = jnp.einsum("bmk,bkn->bmn", xs, qkern.dequantize(qs))
    assert float(jnp.abs(inside - weight_only).max()) > 1e-3
    g = jax.grad(lambda x: jnp.sum(qkern.quaxify(jax.vmap(mm))(x, qs) ** 2))(xs)   # STE
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(jax.vmap(qkern.quaxify(mm))(x, qs) ** 2))(xs),
                               rtol=1e-3, atol=1e-3)

    q = qkern.quantize(ws[0], "int8", act_fmt="int8")
    a, b = _w(64, 2) * 0.1, _w(2, 32) * 0.1
    lw = qkern.LoraArray(q, a, b, alpha=2.0)
    got = qkern.quaxify(mm)(xs[0], lw)
    np.testing.assert_allclose(got, qkern.quaxify(mm)(xs[0], q) + xs[0] @ a @ b, rtol=1e-5, atol=1e-5)
