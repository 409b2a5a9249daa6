"""GPTQ (qkern.quantize(..., gptq=...)): the same QArrays as round-to-nearest when the
inputs are uncorrelated, smaller layer-output error when they are correlated, kernels that
compute the dequantised weights, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

# (format, options): every kind of format the quantiser rounds (int symmetric, packed and
# not, int with zero points, NF4 and FP4 codebooks, fp8, MX).
FORMATS = [
    ("int4", {}),
    ("int4", {"calibration": "minmax", "block_size": 32}),
    ("nf4", {"block_size": 32}),
    ("fp4", {"block_size": 32}),
    ("int8", {}),
    ("fp8_e4m3", {}),
    ("mxfp4", {}),
]
IDS = [f"{f}-{o.get('calibration', 'absmax')}" for f, o in FORMATS]


def _fields(q):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(q)]


def _correlated(k=96, rows=512, seed=0):
    """Activations with strongly correlated features of uneven size: where GPTQ must win."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((rows, k)) @ mix + 0.2 * rng.standard_normal((rows, k))
    x *= np.exp(0.7 * rng.standard_normal(k))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(1)
    x = _correlated()
    w = (rng.standard_normal((96, 40)) / 10).astype(np.float32)   # K = 96: 4-bit pads to 128
    return x, w, x.T @ x / len(x)


@pytest.mark.parametrize("fmt, options", FORMATS, ids=IDS)
def test_identity_hessian_gives_round_to_nearest_exactly(problem, fmt, options):
    """With H = I (no correlation, no dampening) no error propagates: every code, scale and
    zero point is qkern.quantize's, padding included."""
    _, w, _ = problem
    rtn = qkern.quantize(w, fmt, **options)
    g = qkern.quantize(w, fmt, **options, gptq=qkern.GPTQ(np.eye(96), damp=0.0))
    assert type(g) is qkern.QArray and g.layout == rtn.layout and g.fmt == rtn.fmt
    for a, b in zip(_fields(g), _fields(rtn), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt, options", FORMATS, ids=IDS)
def test_gptq_reduces_the_layer_output_error(problem, fmt, options):
    x, w, h = problem
    err = lambda q: np.linalg.norm(x @ w - x @ np.asarray(qkern.dequantize(q)))
    rtn = err(qkern.quantize(w, fmt, **options))
    gptq = err(qkern.quantize(w, fmt, **options, gptq=h))
    assert gptq < 0.9 * rtn, (gptq, rtn)


@pytest.mark.parametrize("fmt, options", [FORMATS[1], FORMATS[3]], ids=[IDS[1], IDS[3]])
def test_act_order(problem, fmt, options):
    """act_order: rows by decreasing H diagonal, block scales from the weights before any
    update (static groups); identity H still gives round-to-nearest."""
    x, w, h = problem
    rtn = qkern.quantize(w, fmt, **options)
    same = qkern.quantize(w, fmt, **options, gptq=qkern.GPTQ(np.eye(96), damp=0.0, act_order=True))
    for a, b in zip(_fields(same), _fields(rtn), strict=True):
        np.testing.assert_array_equal(a, b)
    ordered = qkern.quantize(w, fmt, **options, gptq=qkern.GPTQ(h, act_order=True))
    np.testing.assert_array_equal(ordered.scales, rtn.scales)        # static groups
    err = lambda q: np.linalg.norm(x @ w - x @ np.asarray(qkern.dequantize(q)))
    assert err(ordered) < 0.9 * err(rtn)


def test_kernels_compute_the_dequantised_weights(problem):
    """A GPTQ QArray is an ordinary QArray: the quantised matmul under quaxify computes
    x @ dequantize(q), for x @ W and x @ W.T (a [out, in] weight blocked along axis 1)."""
    x, w, h = problem
    for fmt, options in FORMATS[:4]:
        q = qkern.quantize(w, fmt, **options, gptq=h)
        got = jax.jit(qkern.quaxify(lambda q, x: x @ q))(q, x[:8])
        want = jnp.dot(x[:8], qkern.dequantize(q), precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    qt = qkern.quantize(w.T, "nf4", axis=1, block_size=32, gptq=h)       # [out, in]
    assert qt.block_axis == 1
    got = qkern.quaxify(lambda q, x: x @ q.T)(qt, x[:8])
    np.testing.assert_allclose(got, x[:8] @ np.asarray(qkern.dequantize(qt)).T, rtol=1e-5, atol=1e-5)
    # blocked along `in` either way, GPTQ chooses the same codes
    q = qkern.quantize(w, "nf4", block_size=32, gptq=h)
    np.testing.assert_array_equal(qkern.dequantize(qt).T, qkern.dequantize(q))


def test_dead_inputs_round_to_nearest_and_scale_dtype(problem):
    """Inputs the calibration never saw (zero rows and columns of H) carry no information:
    their rows are rounded to nearest, and nothing is NaN. bfloat16 scales are stored and
    used as stored."""
    x, w, h = problem
    h = h.copy()
    h[:10, :] = 0
    h[:, :10] = 0
    q = qkern.quantize(w, "int4", block_size=32, scale_dtype=jnp.bfloat16, gptq=h)
    assert q.scales.dtype == jnp.bfloat16
    deq = np.asarray(qkern.dequantize(q))
    assert np.isfinite(deq).all()
    rtn = np.asarray(qkern.dequantize(qkern.quantize(w, "int4", block_size=32,
                                                     scale_dtype=jnp.bfloat16)))
    np.testing.assert_array_equal(deq[:10], rtn[:10])        # the first rows: no error reached them


# -- trees, rules, calibration ---------------------------------------------------------------
def _mlp(p, x):
    h = jax.nn.gelu(x @ p["up"]["kernel"])
    return h @ p["down"]["kernel"] + p["bias"]


def _mlp_params():
    rng = np.random.default_rng(2)
    return {"up": {"kernel": jnp.asarray(rng.standard_normal((96, 128)) / 10, jnp.float32)},
            "down": {"kernel": jnp.asarray(rng.standard_normal((128, 64)) / 11, jnp.float32)},
            "bias": jnp.zeros(64)}


def test_hessians_through_jit_vmap_and_scan():
    """H = X^T X / rows of every x @ W, over all batches, whatever transforms the model uses
    inside; the axis W was contracted along; the order of first use."""
    rng = np.random.default_rng(3)
    p = {"w": jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32),
         "head": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)}

    def fn(p, b):
        def body(h, w):
            return jnp.tanh(h @ w), h
        out, seen = jax.lax.scan(body, b, p["w"])          # a stacked weight: not recorded
        return jax.vmap(lambda r: r @ p["head"].T)(out), seen

    batches = [jnp.asarray(rng.standard_normal((5, 16)), jnp.float32) for _ in range(2)]
    hs = qkern.hessians(jax.jit(fn), p, batches)
    assert set(hs) == {"head"} and hs.axis["head"] == 1 and hs.rows["head"] == 10
    xs = np.concatenate([np.asarray(jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), b,
                                                 p["w"])[0]) for b in batches])
    np.testing.assert_allclose(hs["head"], xs.T @ xs / 10, rtol=1e-4, atol=1e-5)
    # the head is [out, in]: GPTQ blocks it along the contracted axis 1
    q = qkern.quantize(p, rules=[qkern.Rule("head", "int8", axis=1, min_size=1)], gptq=hs)
    assert q["head"].block_axis == 1 and isinstance(q["w"], jax.Array)


def test_calibrate_then_gptq_beats_round_to_nearest_on_every_layer():
    p = _mlp_params()
    batches = [jnp.asarray(_correlated(96, 64, seed=s)) for s in range(4)]
    hs = qkern.hessians(_mlp, p, batches, where=r".*kernel")
    assert hs.order == ("up/kernel", "down/kernel") and hs.rows["up/kernel"] == 256
    x = jnp.concatenate(batches)
    np.testing.assert_allclose(hs["up/kernel"], np.asarray(x.T @ x) / 256, rtol=1e-4, atol=1e-4)
    rules = [qkern.Rule(r".*kernel", "nf4", block_size=32, min_size=1)]
    rtn = qkern.quantize(p, rules=rules)
    gq, rep = qkern.quantize(p, rules=rules, gptq=hs, report=True)
    assert "gptq" in rep["up/kernel"].note
    assert isinstance(gq["bias"], jax.Array)
    h = jax.nn.gelu(x @ p["up"]["kernel"])
    for name, inp in (("up", x), ("down", h)):
        err = lambda q: float(jnp.linalg.norm(inp @ p[name]["kernel"] - inp @ qkern.dequantize(q[name]["kernel"])))
        assert err(gq) < 0.95 * err(rtn), name


# -- errors -------------------------------------------------------------------------------------
def test_errors_name_the_problem(problem):
    _, w, h = problem
    p = _mlp_params()
    hs = qkern.hessians(_mlp, p, [jnp.asarray(_correlated(96, 32))], where=r"up/kernel")
    rules = [qkern.Rule(r".*kernel", "nf4", block_size=32, min_size=1)]
    with pytest.raises(ValueError, match=r"no Hessian for 'down/kernel'.*up/kernel"):
        qkern.quantize(p, rules=rules, gptq=hs)
    with pytest.raises(ValueError, match=r"shape \(96, 96\).*\(128, 128\)"):
        qkern.quantize(p, rules=rules, gptq={"up/kernel": h, "down/kernel": h})
    with pytest.raises(ValueError, match=r"shape \(5, 5\).*\(96, 96\)"):
        qkern.quantize(w, "nf4", gptq=np.eye(5))
    with pytest.raises(TypeError, match="one \\[K, K\\] Hessian"):
        qkern.quantize(w, "nf4", gptq=hs)
    with pytest.raises(TypeError, match="Hessians per leaf"):
        qkern.quantize(p, rules=rules, gptq=h)
    with pytest.raises(ValueError, match="double_quant"):
        qkern.quantize(w, "nf4", double_quant=True, gptq=h)
    with pytest.raises(ValueError, match="axis=None"):
        qkern.quantize(w, "int8", axis=None, gptq=h)
    with pytest.raises(ValueError, match="2-D"):
        qkern.quantize(np.stack([w, w]), "int8", gptq=h)
    with pytest.raises(ValueError, match="minmax"):
        qkern.quantize(w, "nf4", calibration="minmax", gptq=h)
    with pytest.raises(ValueError, match="Unknown quantisation format"):
        qkern.quantize(w, "int9", gptq=h)
    with pytest.raises(ValueError, match="damp"):
        qkern.GPTQ(h, damp=-1)
    with pytest.raises(ValueError, match="non-finite"):
        qkern.quantize(w, "int8", gptq=np.full((96, 96), np.nan, np.float32))
    not_psd = 2 * np.ones((96, 96), np.float32) - np.eye(96, dtype=np.float32)
    with pytest.raises(FloatingPointError, match="raise damp"):
        qkern.quantize(w, "int8", gptq=not_psd)
    # the Hessian of a weight contracted along its axis 1 does not fit blocks along axis 0
    hs_t = qkern.Hessians({"w": np.eye(96)}, {"w": 1}, {"w": 1})
    with pytest.raises(ValueError, match="axis 1.*Rule\\(axis=1\\)"):
        qkern.quantize({"w": w}, rules=[qkern.Rule("w", "int8", min_size=1)], gptq=hs_t)
    # calibration input
    with pytest.raises(ValueError, match="empty"):
        qkern.hessians(_mlp, p, [])
    with pytest.raises(ValueError, match="selects no 2-D floating leaf"):
        qkern.hessians(_mlp, qkern.quantize(p, "int8", where=r".*kernel", min_size=1), [jnp.ones((2, 96))])
    with pytest.warns(UserWarning, match="down/kernel"):
        qkern.hessians(lambda p, x: x @ p["up"]["kernel"], p, [jnp.ones((2, 96))], where=r".*kernel")
