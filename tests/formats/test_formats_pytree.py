"""The whole-pytree form: qkern.quantize(params, fmt, where=...) and qkern.dequantize
on trees (nested dicts and lists, and a dataclass-based model object)."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

rng = np.random.default_rng(0)


def _w(*shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def make_params():
    return {
        "layers": [
            {"attn": {"kernel": _w(64, 64), "bias": _w(64)},
             "mlp": {"kernel": _w(64, 64), "scale": _w(64)}},
            {"attn": {"kernel": _w(64, 64), "bias": _w(64)},
             "mlp": {"kernel": _w(64, 64, dtype=jnp.bfloat16), "scale": _w(64)}},
        ],
        "embed": {"table": _w(100, 64)},
        "step": jnp.ones((64, 64), jnp.int32),     # large but not floating
        "tiny": _w(4, 4),                          # floating but tiny
        "numpy": rng.standard_normal((64, 64)).astype(np.float32),
        "python": 1.5,
        "none": None,
    }


def _paths(tree):
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                     for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=lambda x: isinstance(x, qkern.QArray))}


def _check_quantised(q, original, fmt):
    assert isinstance(q, qkern.QArray)
    assert q.fmt == fmt
    assert q.shape == original.shape and q.dtype == original.dtype
    back = np.asarray(qkern.dequantize(q)).astype(np.float32)
    o = np.asarray(original).astype(np.float32)
    # int8 per channel: error <= absmax / 127 / 2 per column (plus bf16 output rounding)
    tol = np.abs(o).max(0) / 127 / 2 * (1 + 1e-5) + np.abs(o) * 2.0 ** -8 + 1e-6
    assert np.all(np.abs(back - o) <= tol)


def test_regex_where_selects_by_full_key_path():
    params = make_params()
    q = qkern.quantize(params, "int8", where=r"layers/\d+/(attn|mlp)/kernel")
    for i in range(2):
        for blk in ("attn", "mlp"):
            _check_quantised(q["layers"][i][blk]["kernel"], params["layers"][i][blk]["kernel"], "int8")
        assert q["layers"][i]["attn"]["bias"] is params["layers"][i]["attn"]["bias"]
        assert q["layers"][i]["mlp"]["scale"] is params["layers"][i]["mlp"]["scale"]
    # unmatched leaves are the very same objects
    for k in ("embed", "step", "tiny", "numpy", "python", "none"):
        if k == "embed":
            assert q[k]["table"] is params[k]["table"]
        else:
            assert q[k] is params[k]
    # the input tree is not modified
    assert not any(isinstance(v, qkern.QArray) for v in _paths(params).values())


def test_regex_is_a_full_match_not_a_search():
    params = make_params()
    with pytest.warns(UserWarning):
        q = qkern.quantize(params, "int8", where=r"kernel")      # no path is exactly "kernel"
    assert not any(isinstance(v, qkern.QArray) for v in _paths(q).values())
    q = qkern.quantize(params, "int8", where=r"layers/0/.*")
    quantised = {p for p, v in _paths(q).items() if isinstance(v, qkern.QArray)}
    assert quantised == {"layers/0/attn/kernel", "layers/0/mlp/kernel"}


def test_predicate_where():
    params = make_params()
    seen = []

    def pick(path, leaf):
        seen.append(path)
        return path.startswith("embed") or path == "layers/1/mlp/kernel"

    q = qkern.quantize(params, "nf4", where=pick)
    quantised = {p for p, v in _paths(q).items() if isinstance(v, qkern.QArray)}
    assert quantised == {"embed/table", "layers/1/mlp/kernel"}
    assert q["layers"][1]["mlp"]["kernel"].dtype == jnp.bfloat16
    # the predicate sees 'a/b/0/c' style paths
    assert "layers/0/attn/kernel" in seen and "embed/table" in seen


def test_no_where_quantises_every_eligible_leaf():
    params = make_params()
    q = qkern.quantize(params, "int8")
    quantised = {p for p, v in _paths(q).items() if isinstance(v, qkern.QArray)}
    assert quantised == {"layers/0/attn/kernel", "layers/0/mlp/kernel", "layers/1/attn/kernel",
                         "layers/1/mlp/kernel", "embed/table", "numpy"}
    # untouched: integer, rank-1, tiny and non-array leaves
    assert q["step"] is params["step"]
    assert q["tiny"] is params["tiny"]
    assert q["layers"][0]["attn"]["bias"] is params["layers"][0]["attn"]["bias"]
    assert q["python"] == 1.5 and q["none"] is None
    _check_quantised(q["numpy"], params["numpy"], "int8")


def test_integer_rank1_and_tiny_leaves_untouched_even_when_matched():
    params = make_params()
    with pytest.warns(UserWarning):
        q = qkern.quantize(params, "int8", where=r"step|tiny|layers/0/attn/bias")
    assert q["step"] is params["step"]
    assert q["tiny"] is params["tiny"]
    assert q["layers"][0]["attn"]["bias"] is params["layers"][0]["attn"]["bias"]


def test_options_are_passed_to_every_leaf():
    params = make_params()
    q = qkern.quantize(params, "int4", where=r".*kernel", block_size=16, axis=-1,
                       scale_dtype=jnp.bfloat16)
    k = q["layers"][0]["attn"]["kernel"]
    assert k.block_size == 16 and k.block_axis == 1 and k.scales.dtype == jnp.bfloat16


def test_warning_when_where_matches_nothing_lists_paths():
    params = make_params()
    with pytest.warns(UserWarning) as record:
        q = qkern.quantize(params, "int8", where=r"decoder/.*")
    msg = " ".join(str(r.message) for r in record)
    assert "decoder" in msg
    for p in ("layers/0/attn/kernel", "embed/table"):
        assert p in msg
    assert jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(params)


def test_no_warning_when_something_matches():
    params = make_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qkern.quantize(params, "int8", where=r"embed/table")


def test_dequantize_tree_restores_arrays():
    params = make_params()
    q = qkern.quantize(params, "int8", where=r".*kernel|embed/.*")
    back = qkern.dequantize(q)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for p, v in _paths(back).items():
        assert not isinstance(v, qkern.QArray)
    _check_quantised(q["embed"]["table"], params["embed"]["table"], "int8")
    np.testing.assert_array_equal(np.asarray(back["embed"]["table"]),
                                  np.asarray(q["embed"]["table"].materialise()))
    assert back["embed"]["table"].dtype == params["embed"]["table"].dtype
    assert back["layers"][1]["mlp"]["kernel"].dtype == jnp.bfloat16
    # leaves that were never quantised come back as the same objects
    assert back["step"] is params["step"] and back["tiny"] is params["tiny"]


def test_tree_with_an_existing_qarray_leaf():
    w = _w(64, 64)
    already = qkern.quantize(w, "nf4")
    tree = {"q": already, "w": w}
    out = qkern.quantize(tree, "int8")
    assert out["q"] is already
    assert isinstance(out["w"], qkern.QArray) and out["w"].fmt == "int8"


def test_min_size_controls_tiny():
    params = make_params()
    q = qkern.quantize(params, "int8", where="tiny", min_size=16)
    assert isinstance(q["tiny"], qkern.QArray)


# -- a dataclass-based model ------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=["kernel", "bias"],
                   meta_fields=["activation"])
@dataclasses.dataclass
class Dense:
    kernel: jax.Array
    bias: jax.Array
    activation: str = "relu"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "head"],
                   meta_fields=["name"])
@dataclasses.dataclass
class MLP:
    layers: list
    head: Dense
    name: str = "mlp"

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(x @ layer.kernel + layer.bias)
        return x @ self.head.kernel + self.head.bias


def make_model():
    return MLP(layers=[Dense(_w(64, 64), _w(64)), Dense(_w(64, 64), _w(64))],
               head=Dense(_w(64, 64), _w(64), activation="none"), name="toy")


def test_dataclass_model_regex():
    model = make_model()
    q = qkern.quantize(model, "int8", where=r"layers/\d+/kernel")
    assert isinstance(q, MLP) and q.name == "toy"
    assert all(isinstance(l, Dense) for l in q.layers)
    for i in range(2):
        _check_quantised(q.layers[i].kernel, model.layers[i].kernel, "int8")
        assert q.layers[i].bias is model.layers[i].bias
    assert q.head.kernel is model.head.kernel and q.head.activation == "none"


def test_dataclass_model_predicate_and_run():
    model = make_model()
    q = qkern.quantize(model, "int8", where=lambda path, leaf: path.endswith("kernel"))
    assert isinstance(q.head.kernel, qkern.QArray)
    x = _w(3, 64)
    y = qkern.quaxify(lambda m, x: m(x))(q, x)
    y_ref = qkern.dequantize(q)(x)
    # the quantised matmul may sum in another order: tolerance relative to the output scale
    scale = float(np.abs(np.asarray(y_ref)).max())
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5 * scale)
    back = qkern.dequantize(q)
    assert isinstance(back, MLP) and not isinstance(back.head.kernel, qkern.QArray)


def test_dataclass_model_warning_lists_attribute_paths():
    with pytest.warns(UserWarning, match="layers/0/kernel"):
        qkern.quantize(make_model(), "int8", where=r"encoder/.*")
