"""QAT: fake_quant's forward is dequantize(quantize(w)) bit for bit, its gradient is the
identity, `ste` makes any function straight-through, and a model trained with fake_quant
then served with quantize computes the same outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

rng = np.random.default_rng(0)


def _w(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


CASES = [("int8", dict(block_size=64)), ("fp8_e4m3", {}), ("mxfp4", {}),
         ("int3", dict(calibration="minmax")), ("nf4", dict(double_quant=True)),
         ("fp4", dict(scale_dtype=jnp.bfloat16, axis=None))]


@pytest.mark.parametrize("fmt, opts", CASES, ids=[f"{f}-{o}" for f, o in CASES])
def test_forward_is_dequantize_of_quantize_bit_for_bit(fmt, opts):
    w = _w(128, 48)
    want = qkern.dequantize(qkern.quantize(w, fmt, **opts))
    np.testing.assert_array_equal(qkern.fake_quant(w, fmt, **opts), want)
    # under jit, compare with the jitted round trip (XLA may fuse multiply-adds either way)
    np.testing.assert_array_equal(
        jax.jit(lambda w: qkern.fake_quant(w, fmt, **opts))(w),
        jax.jit(lambda w: qkern.dequantize(qkern.quantize(w, fmt, **opts)))(w))


def test_bf16_weights_keep_their_dtype():
    w = _w(64, 32, dtype=jnp.bfloat16)
    out = qkern.fake_quant(w, "int4")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, qkern.dequantize(qkern.quantize(w, "int4")))


@pytest.mark.parametrize("fmt", ["nf4"])
def test_gradient_is_straight_through(fmt):
    w, c = _w(64, 32), _w(64, 32)
    g = jax.grad(lambda w: jnp.sum(qkern.fake_quant(w, fmt) * c))(w)
    np.testing.assert_array_equal(g, c)
    # forward mode too
    _, t = jax.jvp(lambda w: qkern.fake_quant(w, fmt), (w,), (c,))
    np.testing.assert_array_equal(t, c)
    # and the plain round trip has no useful gradient: rounding is flat almost everywhere
    g0 = jax.grad(lambda w: jnp.sum(qkern.dequantize(qkern.quantize(w, fmt)) * c))(w)
    assert not np.allclose(g0, c)


def test_ste_decorator():
    @qkern.ste
    def round_to_grid(w, step, *, offset=0.0):
        return jnp.round((w - offset) / step) * step + offset

    w = _w(10)
    np.testing.assert_array_equal(round_to_grid(w, 0.5), jnp.round(w / 0.5) * 0.5)
    np.testing.assert_array_equal(jax.grad(lambda w: round_to_grid(w, 0.5).sum())(w), np.ones(10))
    np.testing.assert_array_equal(
        jax.jit(jax.grad(lambda w: (round_to_grid(w, 0.5, offset=0.1) ** 2).sum()))(w),
        2 * round_to_grid(w, 0.5, offset=0.1))
    assert round_to_grid.__name__ == "round_to_grid"


def test_ste_on_a_pytree_and_with_traced_arguments():
    f = qkern.ste(lambda t, s: jax.tree_util.tree_map(lambda v: jnp.round(v * s) / s, t))
    tree = {"a": _w(3), "b": _w(2, 2)}
    g = jax.grad(lambda s: jax.grad(lambda t: sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(f(t, s))))(tree)["a"].sum())(2.0)
    assert g == 0.0
    grads = jax.grad(lambda t: f(t, 4.0)["b"].sum() * 2)(tree)
    np.testing.assert_array_equal(grads["b"], 2 * np.ones((2, 2)))
    np.testing.assert_array_equal(grads["a"], np.zeros(3))


def test_ste_with_a_step_computed_from_the_differentiated_value():
    """The other arguments may be tracers of the same differentiation (a step from
    max|w|): they are inputs of the straight-through rule, get no gradient through it,
    and the forward value is exact."""
    @qkern.ste
    def rnd(x, step, *, offset=0.0):
        return jnp.round((x - offset) / step) * step + offset

    w = _w(8, 4)
    step = lambda w: jnp.max(jnp.abs(w)) / 7                                # noqa: E731
    np.testing.assert_array_equal(jax.grad(lambda w: rnd(w, step(w)).sum())(w), np.ones((8, 4)))
    np.testing.assert_array_equal(
        jax.jit(jax.grad(lambda w: rnd(w, step=step(w), offset=w[0, 0]).sum()))(w), np.ones((8, 4)))
    assert float(jax.grad(lambda s: rnd(w, s).sum())(0.1)) == 0.0
    y, dy = jax.jvp(lambda w: rnd(w, step(w)), (w,), (2 * w,))
    np.testing.assert_array_equal(y, jnp.round(w / step(w)) * step(w))
    np.testing.assert_array_equal(dy, 2 * w)
    np.testing.assert_allclose(jax.vmap(lambda r: rnd(r, step(r)))(w),
                               jnp.stack([jnp.round(r / step(r)) * step(r) for r in w]), rtol=1e-6)


def test_ste_rejects_functions_that_change_shape():
    with pytest.raises(TypeError, match="shaped like its first argument"):
        qkern.ste(lambda w: w.sum())(_w(4))
    with pytest.raises(TypeError, match="floating array"):
        qkern.fake_quant(jnp.ones((4, 4), jnp.int32), "int8")


# -- the whole loop: train with fake_quant, serve with quantize ----------------------------
RULES = [qkern.Rule(where=r"w1", fmt="int8", block_size=64),
         qkern.Rule(where=r"w2", fmt="int4", block_size=32),
         qkern.Rule(where=r"b.*", fmt=None)]


def model(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def _train(params, x, y, steps=4, lr=0.05):
    def loss(p):
        return jnp.mean((model(qkern.fake_quant(p, rules=RULES), x) - y) ** 2)

    @jax.jit
    def step(p):
        value, grads = jax.value_and_grad(loss)(p)
        return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grads), value

    losses = []
    for _ in range(steps):
        params, value = step(params)
        losses.append(float(value))
    return params, losses


def test_trained_with_fake_quant_then_served_with_quantize_matches_exactly():
    params = {"w1": _w(128, 256) / 11, "b1": jnp.zeros(256), "w2": _w(256, 64) / 16,
              "b2": jnp.zeros(64)}
    x, y = _w(64, 128), _w(64, 64)
    trained, losses = _train(params, x, y)
    assert losses[-1] < losses[0]                     # gradients flowed straight through
    assert not np.array_equal(trained["w1"], params["w1"])

    qat = qkern.fake_quant(trained, rules=RULES)
    served = qkern.quantize(trained, rules=RULES)
    assert served["w1"].fmt == "int8" and served["w2"].fmt == "int4"
    assert served["b1"] is trained["b1"]
    # the weights serving uses are the trained fake-quantised weights, bit for bit ...
    for k in params:
        np.testing.assert_array_equal(qkern.dequantize(served[k]), qat[k])
    # ... so the dense forward pass is bit-identical,
    want = model(qat, x)
    np.testing.assert_array_equal(model(qkern.dequantize(served), x), want)
    np.testing.assert_array_equal(jax.jit(model)(qkern.dequantize(served), x), jax.jit(model)(qat, x))
    # and the quantised kernels (quaxify) compute the same products, summed in their own
    # K-chunk order: equal to float32 rounding (see docs/models.md, "QAT").
    got = qkern.quaxify(model)(served, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_kernel_path_is_bit_identical_where_it_runs_one_dense_dot(monkeypatch):
    # int8 in blocks with M > 32 rows and K within one scan chunk: the xla scan dequantises
    # the tile and runs one dot, the same one the fake-quant model runs. (With the native
    # CPU kernels on, M = 64 runs their GEMM, which sums in its own order: switched off.)
    monkeypatch.setenv("QKERN_NATIVE", "0")
    w, x = _w(256, 96), _w(64, 256)
    with qkern.backend("xla"):
        got = qkern.quaxify(lambda w, x: x @ w)(qkern.quantize(w, "int8", block_size=64), x)
    np.testing.assert_array_equal(got, x @ qkern.fake_quant(w, "int8", block_size=64))


def test_fake_quant_rules_follow_quantize_rules_exactly():
    params = {"w1": _w(128, 256), "b1": _w(256), "small": _w(8, 8), "w2": _w(256, 64),
              "b2": _w(64), "steps": jnp.ones((64, 64), jnp.int32)}
    qat = qkern.fake_quant(params, rules=RULES)
    served = qkern.quantize(params, rules=RULES)
    for k in params:
        if isinstance(served[k], qkern.QArray):
            np.testing.assert_array_equal(qat[k], qkern.dequantize(served[k]))
        else:
            assert qat[k] is params[k]
    with pytest.raises(TypeError, match="either"):
        qkern.fake_quant(params, "int8", rules=RULES)


# -- kernels=True: QAT through the serving kernels, bit-identical to serving -------------
KERNEL_RULES = [qkern.Rule(where=r"w1", fmt="int8", block_size=64),
                qkern.Rule(where=r"w2", fmt="int4", block_size=32),
                qkern.Rule(where=r"w3", fmt="int8", act_fmt="int8"),
                qkern.Rule(where=r"b.*", fmt=None)]


def model3(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"])
    return h @ p["w3"]


def test_kernels_true_training_forward_is_bit_identical_to_serving():
    params = {"w1": _w(128, 256) / 11, "b1": jnp.zeros(256), "w2": _w(256, 64) / 16,
              "w3": _w(64, 32) / 8}
    x, y = _w(8, 128), _w(8, 32)

    def forward(p, x):
        return qkern.quaxify(model3)(qkern.fake_quant(p, rules=KERNEL_RULES, kernels=True), x)

    @jax.jit
    def step(p):
        value, grads = jax.value_and_grad(lambda p: jnp.mean((forward(p, x) - y) ** 2))(p)
        return jax.tree_util.tree_map(lambda a, g: a - 0.05 * g, p, grads), value

    losses = []
    for _ in range(3):
        params, value = step(params)
        losses.append(float(value))
    assert losses[-1] < losses[0]

    served = qkern.quantize(params, rules=KERNEL_RULES)
    # M = 8 rows, per-block scales after partial sums, 4-bit halves, W8A8: the kernels'
    # own summation order, reproduced exactly because training ran the same kernels.
    np.testing.assert_array_equal(jax.jit(forward)(params, x), jax.jit(qkern.quaxify(model3))(served, x))
    np.testing.assert_array_equal(forward(params, x), qkern.quaxify(model3)(served, x))


def test_kernels_true_gradient_is_straight_through():
    w, x, c = _w(64, 32), _w(5, 64), _w(5, 32)
    f = lambda w: jnp.sum(qkern.quaxify(lambda w, x: x @ w)(qkern.fake_quant(w, "nf4", kernels=True), x) * c)
    g = jax.grad(f)(w)
    np.testing.assert_allclose(g, x.T @ c, rtol=1e-5, atol=1e-5)      # d(x @ Wq)/dWq, passed to w
    # W on the left (Equinox's weight @ x) and an op that is not a matmul (materialised)
    h = jax.grad(lambda w: jnp.sum(qkern.quaxify(lambda w, x: (w.T @ x.T).T * 2 + jnp.sum(w))(
        qkern.fake_quant(w, "int8", kernels=True), x) * c))(w)
    assert h.shape == w.shape and np.isfinite(h).all()
    fq = qkern.fake_quant(w, "int8", kernels=True)
    np.testing.assert_array_equal(fq.materialise(), qkern.fake_quant(w, "int8"))
    with pytest.raises(ValueError, match="block_size"):
        qkern.fake_quant(_w(16, 16), "int8", block_size=64, kernels=True)
