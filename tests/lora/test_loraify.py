"""loraify over pytrees, merge back (dense or re-quantised), partition/combine for training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.types.lora import LoraArray


def _params(key):
    k = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(k[0], (50, 64)),
        "layers": [
            {"attn": {"kernel": jax.random.normal(k[1], (64, 64)), "bias": jnp.zeros(64)},
             "mlp": {"kernel": jax.random.normal(k[2], (64, 128))}},
            {"attn": {"kernel": jax.random.normal(k[3], (64, 64)), "bias": jnp.zeros(64)},
             "mlp": {"kernel": jnp.ones((64, 128))}},
        ],
    }


def _model(p, x):
    for layer in p["layers"]:
        x = jnp.tanh(x @ layer["attn"]["kernel"] + layer["attn"]["bias"])
        x = (x @ layer["mlp"]["kernel"])[:, :64]
    return x


def _adapters(tree):
    return [v for v in jax.tree_util.tree_leaves(tree, is_leaf=lambda v: isinstance(v, LoraArray))
            if isinstance(v, LoraArray)]


def test_loraify_by_regex_and_by_predicate(keys):
    p = _params(keys[0])
    out = qkern.loraify(p, rank=4, key=keys[1], where=r".*attn/kernel")
    assert [type(l["attn"]["kernel"]) for l in out["layers"]] == [LoraArray, LoraArray]
    assert isinstance(out["layers"][0]["mlp"]["kernel"], jax.Array)
    assert out["embed"] is p["embed"] and out["layers"][0]["attn"]["bias"] is p["layers"][0]["attn"]["bias"]
    a0, a1 = (l["attn"]["kernel"].a for l in out["layers"])
    assert not np.allclose(a0, a1)                      # each adapter draws its own a
    by_pred = qkern.loraify(p, rank=2, key=keys[1], where=lambda path, v: v.shape[-1] == 128)
    assert len(_adapters(by_pred)) == 2
    assert len(_adapters(qkern.loraify(p, rank=2, key=keys[1]))) == 5   # every rank-2 float leaf


def test_a_fresh_adapter_leaves_the_model_unchanged(keys):
    p = _params(keys[0])
    lp = qkern.loraify(p, rank=4, key=keys[1], where=r".*kernel")
    x = jax.random.normal(keys[2], (3, 64))
    np.testing.assert_allclose(qkern.quaxify(_model)(lp, x), _model(p, x), rtol=1e-5, atol=1e-5)


def test_loraify_on_a_quantised_tree_gives_qlora(keys):
    p = qkern.quantize(_params(keys[0]), "nf4", where=r".*kernel")
    lp = qkern.loraify(p, rank=4, key=keys[1], where=r".*kernel", alpha=8.0)
    ads = _adapters(lp)
    assert len(ads) == 4 and all(isinstance(a.w, qkern.QArray) and a.alpha == 8.0 for a in ads)
    assert all(a.a.dtype == jnp.float32 for a in ads)


def test_loraify_skips_existing_adapters(keys):
    lp = qkern.loraify(_params(keys[0]), rank=4, key=keys[1], where=r".*attn/kernel")
    again = qkern.loraify(lp, rank=2, key=keys[2], where=r".*kernel")
    assert [a.rank for a in _adapters(again)].count(4) == 2


def test_no_match_warns_with_the_paths(keys):
    with pytest.warns(UserWarning, match=r"matched no weight.*layers/0/attn/kernel"):
        out = qkern.loraify(_params(keys[0]), rank=4, key=keys[1], where=r".*nothing.*")
    assert not _adapters(out)


@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_bad_rank_is_an_error(keys, rank):
    with pytest.raises(ValueError, match="rank must be a positive int"):
        qkern.loraify(_params(keys[0]), rank=rank, key=keys[1])


def test_rank_too_large_names_the_leaf(keys):
    with pytest.raises(ValueError, match=r"layers/0/attn/kernel.*rank 65"):
        qkern.loraify(_params(keys[0]), rank=65, key=keys[1], where=r".*attn/kernel")


def _trained(keys, fmt=None):
    p = _params(keys[0])
    if fmt:
        p = qkern.quantize(p, fmt, where=r".*kernel")
    lp = qkern.loraify(p, rank=4, key=keys[1], where=r".*kernel", alpha=4.0)
    # pretend training moved b
    return jax.tree_util.tree_map(
        lambda v: dataclasses.replace(v, b=jax.random.normal(keys[3], v.b.shape) * 0.1)
        if isinstance(v, LoraArray) else v, lp, is_leaf=lambda v: isinstance(v, LoraArray))


@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_merge_gives_plain_weights_with_the_lora_outputs(keys, fmt):
    lp = _trained(keys, fmt)
    merged = qkern.lora.merge(lp)
    assert not _adapters(merged)
    assert all(isinstance(v, jax.Array) for v in jax.tree_util.tree_leaves(merged))
    x = jax.random.normal(keys[2], (3, 64))
    np.testing.assert_allclose(_model(merged, x), qkern.quaxify(_model)(lp, x), rtol=1e-4, atol=1e-4)


def test_merge_requantize_keeps_each_base_format(keys):
    lp = _trained(keys, "nf4")
    lp["layers"][1]["mlp"]["kernel"] = LoraArray.init(
        qkern.quantize(jnp.ones((64, 128)) * jnp.arange(128.0), "int4", calibration="minmax",
                       block_size=32), 2, keys[4])
    merged = qkern.lora.merge(lp, requantize=True)
    attn = merged["layers"][0]["attn"]["kernel"]
    assert isinstance(attn, qkern.QArray) and attn.fmt == "nf4" and attn.block_size == 64
    mlp = merged["layers"][1]["mlp"]["kernel"]
    assert mlp.fmt == "int4" and mlp.block_size == 32 and mlp.zeros is not None
    dense = qkern.lora.merge(lp)
    rel = jnp.linalg.norm(qkern.dequantize(attn) - dense["layers"][0]["attn"]["kernel"]) / \
        jnp.linalg.norm(dense["layers"][0]["attn"]["kernel"])
    assert rel < 0.15                                      # nf4's error, not garbage
    as_int8 = qkern.lora.merge(lp, requantize="int8")
    assert as_int8["layers"][0]["attn"]["kernel"].fmt == "int8"
    with pytest.raises(TypeError, match="requantize"):
        qkern.lora.merge(lp, requantize=3)


def test_merge_requantize_of_a_transposed_base(keys):
    w = jax.random.normal(keys[0], (64, 128))
    q = qkern.quaxify(lambda w: w.T)(qkern.quantize(w, "int8"))        # perm=(1, 0)
    lw = LoraArray(q, jax.random.normal(keys[1], (128, 4)) * 0.1, jax.random.normal(keys[2], (4, 64)) * 0.1)
    m = qkern.lora.merge({"w": lw}, requantize=True)["w"]
    assert m.perm == (1, 0) and m.shape == (128, 64)
    np.testing.assert_allclose(qkern.dequantize(m), lw.materialise(), rtol=0, atol=0.05)


def test_merge_requantize_one_layer_of_a_stack_inside_scan(keys):
    """Inside lax.scan each step's base is one layer of the stacked QArray; re-quantising
    it uses that layer's layout, as merging the whole stack does."""
    w = jax.random.normal(keys[0], (3, 64, 32))
    lw = LoraArray(qkern.quantize(w, "int4"), jax.random.normal(keys[1], (3, 64, 2)) * 0.1,
                   jax.random.normal(keys[2], (3, 2, 32)) * 0.1)
    whole = qkern.dequantize(qkern.lora.merge(lw, requantize=True))
    step = lambda c, layer: (c, qkern.dequantize(qkern.lora.merge(layer, requantize=True)))  # noqa: E731
    per_layer = jax.lax.scan(step, 0, lw)[1]
    np.testing.assert_allclose(per_layer, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_partition_and_combine_train_only_the_factors(keys, fmt):
    lp = _trained(keys, fmt)
    train, frozen = qkern.lora.partition(lp)
    leaves = jax.tree_util.tree_leaves(train)
    assert len(leaves) == 8 and all(v.dtype == jnp.float32 for v in leaves)   # a, b of 4 adapters
    back = qkern.lora.combine(train, frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lp)
    for u, v in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lp)):
        assert u is v
    x = jax.random.normal(keys[2], (3, 64))
    loss = lambda t: jnp.sum(qkern.quaxify(_model)(qkern.lora.combine(t, frozen), x) ** 2)  # noqa: E731
    g = jax.jit(jax.grad(loss))(train)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(train)
    assert all(np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_merge_requantize_an_mx_base(keys, fmt):
    """MX scales are uint8 exponents; re-quantising passed them as scale_dtype and failed."""
    w = jax.random.normal(keys[0], (64, 32))
    lw = LoraArray.init(qkern.quantize(w, fmt), 4, keys[1])
    lw = dataclasses.replace(lw, b=jax.random.normal(keys[2], lw.b.shape) * 0.1)
    merged = qkern.lora.merge({"k": lw}, requantize=True)["k"]
    assert isinstance(merged, qkern.QArray) and merged.fmt == fmt
    dense = qkern.lora.merge({"k": lw})["k"]
    rel = jnp.linalg.norm(qkern.dequantize(merged) - dense) / jnp.linalg.norm(dense)
    assert rel < 0.2


def test_merge_keeps_a_w8a8_base_w8a8(keys):
    """act_fmt and a calibrated act_scale carry over to an int8 merged weight; another
    format cannot run W8A8 and says so."""
    q = dataclasses.replace(qkern.quantize(jax.random.normal(keys[0], (64, 32)), "int8",
                                           act_fmt="int8"), act_scale=jnp.float32(0.02))
    lw = LoraArray.init(q, 4, keys[1])
    for requantize in (True, "int8"):
        m = qkern.lora.merge({"k": lw}, requantize=requantize)["k"]
        assert m.act_fmt == "int8" and float(m.act_scale) == pytest.approx(0.02)
    with pytest.warns(UserWarning, match="runs weight-only"):
        m = qkern.lora.merge({"k": lw}, requantize="nf4")["k"]
    assert m.act_fmt is None
