"""qkern.save / qkern.load: quantised trees round-trip bit for bit, static metadata
included; foreign or future files fail clearly."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

st = pytest.importorskip("safetensors", reason="checkpoints need the `checkpoint` extra "
                                               "(pip install 'qkern[checkpoint]')")
rng = np.random.default_rng(2)


def _w(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def make_tree():
    params = {
        "attn": {"kernel": _w(64, 128), "bias": _w(128)},
        "mlp": [{"kernel": _w(128, 64, dtype=jnp.bfloat16)}, {"kernel": _w(96, 64)}],
        "fp8": _w(64, 64), "mx": _w(64, 64), "dq": _w(256, 64), "minmax": _w(64, 64),
        "w8a8": _w(64, 64), "per_tensor": _w(64, 64),
        "meta": ("name", 3, 2.5, True, None),
        "ids": jnp.arange(10, dtype=jnp.int32),
    }
    rules = [
        qkern.Rule(r"attn/kernel", "nf4", block_size=32),
        qkern.Rule(r"mlp/0/kernel", "int4", block_size=32, scale_dtype=jnp.bfloat16),
        qkern.Rule(r"mlp/1/kernel", "int5", block_size=40),          # padded block axis
        qkern.Rule(r"fp8", "fp8_e4m3"), qkern.Rule(r"mx", "mxfp4"),
        qkern.Rule(r"dq", "nf4", double_quant=True),
        qkern.Rule(r"minmax", "int8", calibration="minmax"),
        qkern.Rule(r"w8a8", "int8", act_fmt="int8"),
        qkern.Rule(r"per_tensor", "int8", axis=None),
    ]
    q = qkern.quantize(params, rules=rules)
    q["w8a8"] = dataclasses.replace(q["w8a8"], act_scale=jnp.float32(0.03))
    q["transposed"] = qkern.quaxify(lambda w: w.T)(qkern.quantize(_w(64, 32), "int8"))
    return q


def _assert_same(a, b):
    is_q = lambda v: isinstance(v, qkern.QArray)
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=is_q)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=is_q)
    assert ta == tb                       # same structure and the same static metadata
    for x, y in zip(la, lb):
        if is_q(x):
            assert type(y) is qkern.QArray
            for f in dataclasses.fields(x):
                vx, vy = getattr(x, f.name), getattr(y, f.name)
                if f.metadata.get("qkern.static"):
                    assert vx == vy, f.name
                elif vx is None:
                    assert vy is None
                else:
                    assert vx.dtype == vy.dtype and vx.shape == vy.shape
                    np.testing.assert_array_equal(np.asarray(vx).reshape(-1).view(np.uint8),
                                                  np.asarray(vy).reshape(-1).view(np.uint8))
        elif isinstance(x, (jax.Array, np.ndarray)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y and type(x) is type(y)


def test_round_trip_is_bit_exact_with_metadata(tmp_path):
    tree = make_tree()
    qkern.save(tmp_path / "m.safetensors", tree)
    back = qkern.load(tmp_path / "m.safetensors")
    _assert_same(tree, back)
    assert back["transposed"].perm == (1, 0) and back["w8a8"].act_fmt == "int8"
    assert back["meta"] == ("name", 3, 2.5, True, None)
    # and it computes the same thing
    x, z = _w(3, 64), _w(3, 256)
    f = qkern.quaxify(lambda p, x, z: x @ p["w8a8"] + z @ p["dq"] + x @ p["attn"]["kernel"][:, :64])
    np.testing.assert_array_equal(f(back, x, z), f(tree, x, z))


def test_file_is_plain_safetensors_with_versioned_header(tmp_path):
    qkern.save(tmp_path / "m.safetensors", make_tree())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        header = json.loads(f.metadata()["qkern"])
        names = set(f.keys())
    assert header["format"] == "qkern.checkpoint" and header["version"] == 1
    assert {"attn/kernel.data", "attn/kernel.scales", "attn/bias", "ids"} <= names
    entry = next(e for e in header["leaves"] if e["path"] == "attn/kernel")
    assert entry["static"]["fmt"] == "nf4" and entry["static"]["layout"]["block_size"] == 32


def test_incompatible_version_errors_clearly(tmp_path, rewrite_header):
    qkern.save(tmp_path / "m.safetensors", {"w": qkern.quantize(_w(64, 64), "int8")})
    rewrite_header(tmp_path / "m.safetensors", tmp_path / "v99.safetensors",
                    lambda h: h.update(version=99, qkern="9.0.0"))
    with pytest.raises(qkern.CheckpointError, match=r"version 99 \(written by qkern 9\.0\.0\).*reads version\(s\) 1, 2"):
        qkern.load(tmp_path / "v99.safetensors")


def test_foreign_files_error_clearly(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": np.ones((2, 2), np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(qkern.CheckpointError, match="without qkern metadata"):
        qkern.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(qkern.CheckpointError, match="not a safetensors file"):
        qkern.load(tmp_path / "junk.bin")


@dataclasses.dataclass
class Model:
    w: object
    b: object


jax.tree_util.register_dataclass(Model, data_fields=["w", "b"], meta_fields=[])


def test_custom_nodes_load_with_like(tmp_path):
    m = Model(qkern.quantize(_w(64, 64), "nf4"), _w(64))
    qkern.save(tmp_path / "m.safetensors", m)
    with pytest.raises(qkern.CheckpointError, match="like="):
        qkern.load(tmp_path / "m.safetensors")
    back = qkern.load(tmp_path / "m.safetensors", like=m)
    _assert_same(m, back)
    with pytest.raises(qkern.CheckpointError, match="does not match"):
        qkern.load(tmp_path / "m.safetensors", like={"w": 1, "x": 2})
    with pytest.raises(TypeError, match="cannot store"):
        qkern.save(tmp_path / "bad.safetensors", {"f": object()})
