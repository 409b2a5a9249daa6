"""qkern.quantize(params, rules=[qkern.Rule(...)]): first match wins, skipping rules, the
report, and the errors and warnings for rules that do not fit."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

rng = np.random.default_rng(0)


def _w(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def make_params():
    return {
        "embed": {"table": _w(100, 64)},
        "layers": [
            {"attn": {"kernel": _w(64, 128), "bias": _w(128)},
             "mlp": {"kernel": _w(128, 64), "scale": _w(64)}},
            {"attn": {"kernel": _w(64, 128), "bias": _w(128)},
             "mlp": {"kernel": _w(128, 64, dtype=jnp.bfloat16), "scale": _w(64)}},
        ],
        "step": jnp.zeros((64, 64), jnp.int32),
        "head": None,
    }


RULES = [
    qkern.Rule(where=r".*embed.*", fmt=None),
    qkern.Rule(where=r".*attn.*kernel", fmt="nf4", block_size=32),
    qkern.Rule(where=r".*mlp.*", fmt="int8"),
]


def test_first_match_wins_and_skip_rules_keep_leaves_dense():
    params = make_params()
    rules = RULES + [qkern.Rule(where=r".*", fmt="int4")]   # would take them all: earlier rules win
    with pytest.warns(UserWarning, match=r"rules\[3\]"):
        q = qkern.quantize(params, rules=rules)
    assert q["embed"]["table"] is params["embed"]["table"]           # skipped by rule 0
    for layer in q["layers"]:
        assert layer["attn"]["kernel"].fmt == "nf4" and layer["attn"]["kernel"].block_size == 32
        assert layer["mlp"]["kernel"].fmt == "int8"                 # not int4: rule 2 came first
        assert not isinstance(layer["attn"]["bias"], qkern.QArray)  # rank 1
    assert q["step"] is params["step"] and q["head"] is None
    assert q["layers"][1]["mlp"]["kernel"].dtype == jnp.bfloat16


def test_rules_leaves_equal_quantize_of_each_leaf():
    params = make_params()
    q = qkern.quantize(params, rules=RULES)
    ref = qkern.quantize(params["layers"][0]["attn"]["kernel"], "nf4", block_size=32)
    got = q["layers"][0]["attn"]["kernel"]
    np.testing.assert_array_equal(got.data, ref.data)
    np.testing.assert_array_equal(got.scales, ref.scales)


def test_report_rows_bytes_and_table():
    params = make_params()
    q, rep = qkern.quantize(params, rules=RULES, report=True)
    assert isinstance(rep, qkern.QuantReport)
    row = rep["layers/0/attn/kernel"]
    assert (row.fmt, row.rule, row.shape) == ("nf4", 1, (64, 128))
    assert row.bytes_before == 64 * 128 * 4
    assert row.bytes_after == q["layers"][0]["attn"]["kernel"].nbytes()
    # nf4 in blocks of 32 with f32 scales: 4 + 32/32 bits per parameter
    assert row.bytes_after == 64 * 128 // 2 + (64 // 32) * 128 * 4
    assert rep["embed/table"].fmt is None and rep["embed/table"].rule == 0
    assert "kept dense" in rep["embed/table"].note
    assert rep["step"].note == "not floating"
    assert rep["layers/0/attn/bias"].note == "no rule"
    assert rep["layers/1/mlp/kernel"].bytes_before == 128 * 64 * 2          # bfloat16
    total = sum(np.asarray(l).nbytes for l in jax.tree_util.tree_leaves(params))
    assert rep.bytes_before == total
    assert rep.bytes_after == sum(np.asarray(l).nbytes for l in jax.tree_util.tree_leaves(q))
    assert rep.ratio > 1.5
    text = str(rep)
    for needle in ("layers/0/attn/kernel", "nf4", "dense", "total", "x smaller", "path"):
        assert needle in text
    assert len(text.splitlines()) == len(rep.rows) + 4
    assert "QuantReport(" in repr(rep)
    with pytest.raises(KeyError, match="no leaf"):
        rep["nope"]


def test_legacy_signature_unchanged_and_can_report():
    params = make_params()
    q = qkern.quantize(params, "int8", where=r".*kernel")
    assert q["layers"][0]["attn"]["kernel"].fmt == "int8"
    q2, rep = qkern.quantize(params, "int8", where=r".*kernel", report=True)
    assert [r.path for r in rep.quantised] == [
        "layers/0/attn/kernel", "layers/0/mlp/kernel", "layers/1/attn/kernel", "layers/1/mlp/kernel"]
    assert qkern.quantize(params)["embed"]["table"].fmt == "int8"   # default fmt is int8


def test_rule_matching_nothing_warns_with_paths():
    params = make_params()
    with pytest.warns(UserWarning, match=r"rules\[1\].*decoder.*layers/0/attn/kernel"):
        qkern.quantize(params, rules=[qkern.Rule(r".*kernel", "int8"),
                                      qkern.Rule(r"decoder/.*", "nf4")])


def test_rule_shadowed_by_earlier_rule_warns():
    params = make_params()
    with pytest.warns(UserWarning, match="already claimed"):
        qkern.quantize(params, rules=[qkern.Rule(r".*", "int8"),
                                      qkern.Rule(r".*attn.*", "nf4")])


def test_no_warning_when_every_rule_is_used():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qkern.quantize(make_params(), rules=RULES)


def test_block_larger_than_axis_names_leaf_rule_and_reason():
    params = {"small": {"kernel": _w(32, 64)}, "big": {"kernel": _w(256, 64)}}
    with pytest.raises(ValueError) as e:
        qkern.quantize(params, rules=[qkern.Rule(r".*kernel", "int8", block_size=64)])
    msg = str(e.value)
    assert "'small/kernel'" in msg and "(32, 64)" in msg
    assert "rules[0]" in msg and "block_size 64 is larger" in msg


@pytest.mark.parametrize("bad, match", [
    (dict(fmt="int9"), "int9"),
    (dict(fmt="nf4", act_fmt="int8"), "needs fmt='int8'"),
    (dict(fmt="int8", act_fmt="fp8"), "activation formats"),
    (dict(fmt="int8", act_fmt="int8", calibration="minmax"), "zero points"),
    (dict(fmt="int8", calibration="median"), "calibration"),
])
def test_bad_rules_fail_when_written(bad, match):
    with pytest.raises(ValueError, match=match):
        qkern.Rule(where=".*", **bad)


def test_rules_and_fmt_are_exclusive():
    with pytest.raises(TypeError, match="either"):
        qkern.quantize(make_params(), "nf4", rules=RULES)
    with pytest.raises(TypeError, match="either"):
        qkern.quantize(make_params(), where=".*", rules=RULES)
    with pytest.raises(TypeError, match="qkern.Rule"):
        qkern.quantize(make_params(), rules=[(".*", "int8")])
    with pytest.raises(TypeError, match="single array"):
        qkern.quantize(_w(64, 64), rules=RULES)


def test_predicate_where_and_min_size():
    params = make_params()
    with pytest.warns(UserWarning, match="10000 elements"):
        q, rep = qkern.quantize(params, rules=[
            qkern.Rule(where=lambda path, leaf: leaf.shape == (128, 64), fmt="int4",
                       min_size=10_000)], report=True)
    # (128, 64) = 8192 elements < 10_000: claimed but kept dense, and the report says why
    assert rep["layers/0/mlp/kernel"].note == "< min_size=10000 elements"
    assert not any(isinstance(l, qkern.QArray) for l in jax.tree_util.tree_leaves(
        q, is_leaf=lambda v: isinstance(v, qkern.QArray)))


def test_already_quantised_leaves_are_reported_and_kept():
    params = make_params()
    once = qkern.quantize(params, rules=[qkern.Rule(r".*mlp.*", "int8")])
    twice, rep = qkern.quantize(once, rules=[qkern.Rule(r".*attn.*kernel", "nf4")], report=True)
    assert twice["layers"][0]["mlp"]["kernel"] is once["layers"][0]["mlp"]["kernel"]
    assert rep["layers/0/mlp/kernel"].note == "already quantised"


def test_rules_model_runs_under_quaxify_like_its_dequantised_reference():
    params = make_params()
    q = qkern.quantize(params, rules=RULES)

    def model(p, x):
        for layer in p["layers"]:
            h = jax.nn.gelu(x @ layer["attn"]["kernel"] / 8 + layer["attn"]["bias"])
            x = x + (h @ layer["mlp"]["kernel"]).astype(x.dtype) / 11
        return x

    x = _w(3, 64)
    got = qkern.quaxify(model)(q, x)
    want = model(qkern.dequantize(q), x)
    # the kernels accumulate in their own order; the bf16 layer rounds its output
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("fmt, opts", [("int8", {}), ("nf4", dict(block_size=32)),
                                       ("int4", dict(double_quant=True)),
                                       ("int8", dict(calibration="minmax", block_size=32))])
def test_out_in_weights_blocked_along_in_run_the_kernels(fmt, opts, monkeypatch):
    # Equinox stores Linear weights as [out, in] and computes weight @ x: quantised along
    # `in` (axis -1), the codes are stored transposed ([in, out], blocked along axis 0) with
    # a pending transpose, so the kernels take them as they are: no dequantisation, and no
    # transpose of the codes per call.
    import qkern.types._qarray_matmul as qp

    w = _w(48, 96)                                             # [out, in]
    q = qkern.quantize(w, fmt, axis=-1, **opts)
    assert q.shape == (48, 96) and q.block_axis == 1
    assert q.layout.axis == 0 and q.perm == (1, 0) and q.layout.shape == (96, 48)
    np.testing.assert_array_equal(qkern.dequantize(q),
                                  qkern.dequantize(qkern.quantize(w.T, fmt, **opts)).T)
    calls = []
    real = qkern.QArray.materialise
    monkeypatch.setattr(qkern.QArray, "materialise", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(qp, "_rows_blocked", lambda w: calls.append("transposed codes") or w)
    x = _w(96, 5)
    got = qkern.quaxify(lambda w, x: w @ x)(q, x)
    got_t = qkern.quaxify(lambda w, y: y @ w)(q, _w(3, 48))         # contracting `out`
    assert calls == []
    monkeypatch.undo()
    np.testing.assert_allclose(got, qkern.dequantize(q) @ x, rtol=1e-5, atol=1e-4)
    assert got_t.shape == (3, 96)


@pytest.mark.parametrize("fmt, opts", [("int8", {}), ("nf4", dict(block_size=32)),
                                       ("int4", dict(calibration="minmax", block_size=32))])
def test_stacked_out_in_layers_scan_with_the_kernels(fmt, opts, monkeypatch):
    # Equinox's scan-over-layers: stacked [L, out, in] weights quantised along `in`, each
    # step computing weight @ x. Stored with the last two axes swapped and a pending
    # transpose, so each step's slice is already the kernels' layout.
    import qkern.types._qarray_matmul as qp

    w = _w(3, 48, 96)
    q = qkern.quantize(w, fmt, axis=-1, **opts)
    assert q.shape == (3, 48, 96) and q.block_axis == 2 and q.perm == (0, 2, 1)
    np.testing.assert_array_equal(
        qkern.dequantize(q), jnp.swapaxes(qkern.dequantize(qkern.quantize(
            jnp.swapaxes(w, 1, 2), fmt, axis=1, **opts)), 1, 2))

    def f(q, x):
        def step(h, wl):
            y = jax.vmap(lambda hi: wl @ hi)(h)                 # [5, 48]
            return jnp.tanh(jnp.concatenate([y, y], axis=1)), None
        return jax.lax.scan(step, x, q)[0]

    calls = []
    real = qkern.QArray.materialise
    monkeypatch.setattr(qkern.QArray, "materialise", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(qp, "_rows_blocked", lambda w: calls.append("transposed codes") or w)
    x = _w(5, 96)
    got = jax.jit(qkern.quaxify(f))(q, x)
    assert calls == []
    monkeypatch.undo()
    np.testing.assert_allclose(got, f(qkern.dequantize(q), x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_weights_stored_blocked_along_axis_1_still_run_the_kernels(fmt, monkeypatch):
    # QArrays stored blocked along axis 1 with no pending transpose (older checkpoints;
    # bench/out_in_layout.py builds them the same way): the dispatch transposes their codes.
    import dataclasses

    q = qkern.quantize(_w(96, 48), fmt)                          # [in, out], blocks along in
    t = lambda a: None if a is None else a.T
    legacy = dataclasses.replace(q, data=t(q.data), scales=t(q.scales), zeros=t(q.zeros),
                                 layout=dataclasses.replace(q.layout, shape=(48, 96), axis=1))
    assert legacy.shape == (48, 96) and legacy.block_axis == 1
    calls = []
    real = qkern.QArray.materialise
    monkeypatch.setattr(qkern.QArray, "materialise", lambda self: calls.append(1) or real(self))
    x = _w(5, 96)
    got = qkern.quaxify(lambda w, x: x @ w.T)(legacy, x)
    assert calls == []
    monkeypatch.undo()
    np.testing.assert_allclose(got, x @ qkern.dequantize(q), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(qkern.dequantize(legacy), qkern.dequantize(q).T)


def test_out_in_layout_bench_script_runs(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "out_in_layout.py"
    spec = importlib.util.spec_from_file_location("out_in_layout", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--k", "256", "--n", "128", "--m", "3", "--formats", "int8,nf4,int4",
              "--repeats", "1"])                                   # asserts the results agree
    assert capsys.readouterr().out.count("stored axis 1 |") == 3


def test_out_in_w8a8_runs_w8a8():
    w = _w(48, 96)
    q = qkern.quantize(w, "int8", axis=-1, act_fmt="int8")
    x = _w(5, 96)
    got = qkern.quaxify(lambda w, x: jax.vmap(lambda xi: w @ xi)(x))(q, x)
    s = jnp.abs(x).max(axis=1, keepdims=True) / 127
    xq = jnp.clip(jnp.round(x / s), -127, 127) * s
    np.testing.assert_allclose(got, xq @ qkern.dequantize(q).T, rtol=1e-4, atol=1e-4)


def test_typed_prng_keys_in_the_tree_are_left_alone():
    """NNX modules hold typed keys (nnx.Rngs); NumPy cannot name their dtype."""
    tree = {"w": jnp.ones((64, 64)), "rng": jax.random.key(0)}
    for q in (qkern.quantize(tree, "int8"),
              qkern.quantize(tree, rules=[qkern.Rule(where=r".*", fmt="int8")]),
              qkern.fake_quant(tree, rules=[qkern.Rule(where=r".*", fmt="int8")])):
        assert q["rng"] is tree["rng"]
    assert isinstance(qkern.quantize(tree, "int8")["w"], qkern.QArray)


def test_quantising_a_loraified_tree_quantises_each_base_only():
    """Rules see a LoraArray as the weight it wraps (its own path, as before loraify): the
    base is quantised, the trainable factors never are (they became QArrays and the model
    could not run)."""
    w = jax.random.normal(jax.random.PRNGKey(0), (128, 128))
    lp = qkern.loraify({"layer": {"kernel": w}}, rank=8, key=jax.random.PRNGKey(1))
    for qp in (qkern.quantize(lp, "nf4"),
               qkern.quantize(lp, rules=[qkern.Rule(where=r".*kernel", fmt="nf4")])):
        lw = qp["layer"]["kernel"]
        assert isinstance(lw, qkern.LoraArray) and isinstance(lw.w, qkern.QArray)
        assert not isinstance(lw.a, qkern.QArray) and not isinstance(lw.b, qkern.QArray)
        x = jax.random.normal(jax.random.PRNGKey(2), (3, 128))
        np.testing.assert_allclose(qkern.quaxify(lambda p, x: x @ p["layer"]["kernel"])(qp, x),
                                   x @ lw.materialise(), rtol=1e-4, atol=1e-4)
    _, report = qkern.quantize(lp, "nf4", report=True)
    assert [r.path for r in report.rows] == ["layer/kernel"]
    fq = qkern.fake_quant(lp, rules=[qkern.Rule(where=r".*kernel", fmt="nf4")])
    np.testing.assert_array_equal(fq["layer"]["kernel"].w,
                                  qkern.dequantize(qkern.quantize(w, "nf4")))
    np.testing.assert_array_equal(fq["layer"]["kernel"].a, lp["layer"]["kernel"].a)


def test_fake_quant_of_a_pytree_with_fmt_names_rules():
    with pytest.raises(TypeError, match="takes one array.*rules="):
        qkern.fake_quant({"k": jnp.ones((64, 64))}, "int8")
    with pytest.raises(TypeError, match="QArray already"):
        qkern.fake_quant(qkern.quantize(jnp.ones((64, 64))), "int8")
