"""qkern.save / qkern.load: LoraArrays (dense or quantised base, mixed with QArrays and
plain arrays) load without `like`; a missing file, a header that is not qkern's and
malformed QArray metadata fail at load, naming the file and the leaf."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

st = pytest.importorskip("safetensors", reason="checkpoints need the `checkpoint` extra "
                                               "(pip install 'qkern[checkpoint]')")
rng = np.random.default_rng(3)
is_node = lambda v: isinstance(v, (qkern.QArray, qkern.LoraArray))   # noqa: E731


def _w(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _lora(w, rank, alpha=None):
    din, dout = w.shape[-2:]
    return qkern.LoraArray(w, _w(din, rank), _w(rank, dout) * 0.1, alpha=alpha)


def make_tree():
    return {
        "dense": _lora(_w(64, 32), 4, alpha=8.0),
        "qlora": _lora(qkern.quantize(_w(64, 64), "nf4", block_size=32), 2),
        "qlora_t": _lora(qkern.quaxify(lambda w: w.T)(qkern.quantize(_w(64, 32), "int8")), 3),
        "q": qkern.quantize(_w(64, 64), "int4", block_size=32, calibration="minmax"),
        "layers": [{"kernel": _lora(_w(32, 32, dtype=jnp.bfloat16), 2), "bias": _w(32)},
                   (_w(3), None, "name", 7)],
    }


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=is_node)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=is_node)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        if isinstance(x, (qkern.QArray, qkern.LoraArray)):
            for f in dataclasses.fields(x):
                vx, vy = getattr(x, f.name), getattr(y, f.name)
                if f.metadata.get("qkern.static"):
                    assert vx == vy, f.name
                else:
                    _assert_same(vx, vy)
        elif isinstance(x, (jax.Array, np.ndarray)):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                          np.asarray(y).reshape(-1).view(np.uint8))
        else:
            assert x == y and type(x) is type(y)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def _header(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["qkern"])


# -- LoraArrays -----------------------------------------------------------------------------
def test_lora_trees_load_without_like(tmp_path):
    tree = make_tree()
    qkern.save(tmp_path / "m.safetensors", tree)
    back = qkern.load(tmp_path / "m.safetensors")
    _assert_same(tree, back)
    assert back["dense"].alpha == 8.0 and back["qlora"].w.block_size == 32
    assert back["qlora_t"].w.perm == (1, 0)
    x, y = _w(5, 64), _w(5, 32)
    f = qkern.quaxify(lambda p, x, y: (x @ p["dense"], x @ p["qlora"], y @ p["qlora_t"],
                                       y @ p["layers"][0]["kernel"].astype(jnp.float32)))
    for u, v in zip(f(back, x, y), f(tree, x, y)):
        np.testing.assert_array_equal(u, v)
    assert _header(tmp_path / "m.safetensors")["version"] == 2


def test_a_lora_array_at_the_root(tmp_path):
    lw = _lora(qkern.quantize(_w(64, 64), "nf4"), 4, alpha=2.0)
    qkern.save(tmp_path / "r.safetensors", lw)
    _assert_same(lw, qkern.load(tmp_path / "r.safetensors"))


def test_the_halves_of_partition_round_trip(tmp_path):
    tree = make_tree()
    train, frozen = qkern.lora.partition(tree)
    for name, half in (("train", train), ("frozen", frozen)):
        qkern.save(tmp_path / f"{name}.safetensors", half)
        _assert_same(half, qkern.load(tmp_path / f"{name}.safetensors"))
    back = qkern.lora.combine(qkern.load(tmp_path / "train.safetensors"),
                              qkern.load(tmp_path / "frozen.safetensors"))
    _assert_same(tree, back)


def test_files_without_lora_keep_version_1_and_like_still_works(tmp_path):
    qkern.save(tmp_path / "q.safetensors", {"q": qkern.quantize(_w(64, 64), "int8")})
    assert _header(tmp_path / "q.safetensors")["version"] == 1
    tree = make_tree()
    qkern.save(tmp_path / "m.safetensors", tree)
    _assert_same(tree, qkern.load(tmp_path / "m.safetensors", like=tree))


def test_a_lora_whose_parts_do_not_fit_fails_at_load(tmp_path, rewrite_header):
    qkern.save(tmp_path / "m.safetensors", {"x": {"l": _lora(_w(64, 32), 4)}, "y": _w(64, 3)})

    def swap(h):                       # point the adapter's `a` at another [64, 3] tensor
        node = h["structure"]["dict"]["x"]["dict"]["l"]["lora"]
        node["a"] = h["structure"]["dict"]["y"]
    rewrite_header(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", swap)
    with pytest.raises(qkern.CheckpointError, match=r"bad\.safetensors.*LoraArray at x/l"):
        qkern.load(tmp_path / "bad.safetensors")


# -- errors ------------------------------------------------------------------------------------
def test_a_missing_file_is_file_not_found(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        qkern.load(path)
    assert e.value.filename == str(path) and str(path) in str(e.value)
    assert "safetensors file" not in str(e.value)


@pytest.mark.parametrize("drop", ["leaves", "structure"])
def test_a_header_without_leaves_is_not_a_qkern_checkpoint(tmp_path, drop, rewrite_header):
    qkern.save(tmp_path / "m.safetensors", {"w": _w(4, 4)})
    rewrite_header(tmp_path / "m.safetensors", tmp_path / "bad.safetensors",
                    lambda h: h.pop(drop))
    with pytest.raises(ValueError) as e:
        qkern.load(tmp_path / "bad.safetensors")
    assert isinstance(e.value, qkern.CheckpointError)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "not a qkern checkpoint" in msg and repr(drop) in msg


def _q_edit(edit):
    def go(h):
        entry = next(e for e in h["leaves"] if e["path"] == "layers/0/kernel")
        edit(entry)
    return go


def _set_layout(key, value):
    return _q_edit(lambda e: e["static"]["layout"].__setitem__(key, value))


MALFORMED = {
    "non-integer block size": (_set_layout("block_size", 32.5), r"block_size 32\.5"),
    "string block size": (_set_layout("block_size", "32"), r"block_size '32'"),
    "block size that does not fit the scales": (_set_layout("block_size", 16),
                                                r"scales has shape \(2, 64\).*needs \(4, 64\)"),
    "shape that does not fit the data": (_set_layout("shape", [64, 32]),
                                         r"data has shape \(32, 64\).*needs \(32, 32\)"),
    "axis out of range": (_set_layout("axis", 2), "axis 2"),
    "bad shape": (_set_layout("shape", [64, "x"]), "shape"),
    "unknown format": (_q_edit(lambda e: e["static"].__setitem__("fmt", "nf5")), "nf5"),
    "integer dtype": (_q_edit(lambda e: e["static"].__setitem__("dtype", "int32")), "floating"),
    "unknown dtype": (_q_edit(lambda e: e["static"].__setitem__("dtype", "float99")), "float99"),
    "bad perm": (_q_edit(lambda e: e["static"].__setitem__("perm", [0, 0])), "perm"),
    "bad act_fmt": (_q_edit(lambda e: e["static"].__setitem__("act_fmt", "int4")), "act_fmt"),
    "no scales": (_q_edit(lambda e: e["fields"].pop("scales")), "scales"),
    "missing tensor": (_q_edit(lambda e: e["fields"]["data"].__setitem__("name", "gone")), "gone"),
    "missing static": (_q_edit(lambda e: e["static"].pop("layout")), "layout"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_qarray_metadata_fails_at_load_naming_the_leaf(tmp_path, case, rewrite_header):
    edit, detail = MALFORMED[case]
    tree = {"layers": [{"kernel": qkern.quantize(_w(64, 64), "nf4", block_size=32)}]}
    qkern.save(tmp_path / "m.safetensors", tree)
    rewrite_header(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", edit)
    with pytest.raises(qkern.CheckpointError) as e:
        qkern.load(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "bad.safetensors" in msg and "'layers/0/kernel'" in msg, msg
    assert re.search(detail, msg), msg


@pytest.mark.parametrize("structure", [{"dict": [1]}, {"lora": {"w": {"leaf": 0}}, "alpha": 1.0},
                                       {"list": 5}, {"tuple": {"a": 1}}],
                         ids=["dict-of-list", "lora-without-factors", "list-of-int", "tuple-of-dict"])
def test_a_damaged_structure_is_a_checkpoint_error(tmp_path, structure, rewrite_header):
    """Structures of the wrong shape raised bare AttributeError / KeyError / TypeError."""
    qkern.save(tmp_path / "m.safetensors", {"w": _w(4, 4)})
    rewrite_header(tmp_path / "m.safetensors", tmp_path / "bad.safetensors",
                    lambda h: h.__setitem__("structure", structure))
    with pytest.raises(qkern.CheckpointError, match=r"bad\.safetensors: damaged checkpoint"):
        qkern.load(tmp_path / "bad.safetensors")


def test_a_lora_with_neither_base_arrays_nor_factors_is_refused(tmp_path, rewrite_header):
    """A LoraArray entry whose base has no arrays (the trainable half) must have both
    factors; one without is damaged, not a tree to rebuild."""
    train, _ = qkern.lora.partition({"l": _lora(qkern.quantize(_w(64, 32), "nf4"), 2)})
    qkern.save(tmp_path / "train.safetensors", train)
    back = qkern.load(tmp_path / "train.safetensors")                   # the trainable half
    assert back["l"].w.data is None and back["l"].a.shape == (64, 2)

    def drop_b(h):
        h["structure"]["dict"]["l"]["lora"]["b"] = {"none": None}
    rewrite_header(tmp_path / "train.safetensors", tmp_path / "bad.safetensors", drop_b)
    with pytest.raises(qkern.CheckpointError, match=r"the LoraArray at l has neither"):
        qkern.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("saved, named, detail", [
    ("mxfp8", "fp8_e4m3", "scales is uint8, but fp8_e4m3 stores scales as a floating dtype"),
    ("fp8_e4m3", "int8", "data is uint8, but int8 stores data as int8"),
    ("int8", "fp8_e5m2", "data is int8, but fp8_e5m2 stores data as uint8 or float8_e5m2"),
])
def test_a_header_naming_another_format_of_the_same_shapes_is_refused(
        tmp_path, rewrite_header, saved, named, detail):
    """Same shapes, other codes: the dtypes tell (mxfp8's E8M0 scale bytes read as float
    scales came out 15,000x too large before this check)."""
    tree = {"layers": [{"kernel": qkern.quantize(_w(64, 64), saved, block_size=32)}]}
    qkern.save(tmp_path / "m.safetensors", tree)
    rewrite_header(tmp_path / "m.safetensors", tmp_path / "bad.safetensors",
                   _q_edit(lambda e: e["static"].__setitem__("fmt", named)))
    with pytest.raises(qkern.CheckpointError, match=re.escape(detail)):
        qkern.load(tmp_path / "bad.safetensors")
