"""Checkpoints of quantised trees: `qkern.save(path, tree)` and `qkern.load(path)`.

    qparams = qkern.quantize(params, rules=rules)
    qkern.save("model.safetensors", qparams)
    qparams = qkern.load("model.safetensors")            # bit for bit, metadata included

One safetensors file (the `checkpoint` extra: `pip install qkern[checkpoint]`): every
array is a tensor named by its key path ("layers/0/attn/kernel.data"), and the header's
metadata holds the tree's structure and each QArray's static fields (format, layout,
dtype, pending transpose, activation format) as JSON, with a format version. Arrays
whose dtype safetensors' numpy API lacks (bfloat16, fp8) are stored as their raw bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .recipes._paths import path_str
from ._version import __version__
from .formats import Layout
from .types.qarray import QArray

FORMAT = "qkern.checkpoint"
VERSION = 1                    # bump when the layout of the header or tensors changes
_READS = (1,)                  # versions this qkern can read

_NATIVE = {np.dtype(t) for t in (np.float64, np.float32, np.float16, np.int64, np.uint64,
                                 np.int32, np.uint32, np.int16, np.uint16, np.int8,
                                 np.uint8, np.bool_, np.complex64)}
_QFIELDS = tuple(f.name for f in dataclasses.fields(QArray)
                 if not f.metadata.get("qkern.static", False))
_QSTATIC = tuple(f.name for f in dataclasses.fields(QArray)
                 if f.metadata.get("qkern.static", False))


class CheckpointError(ValueError):
    """A file that is not a qkern checkpoint, or one this version cannot read."""


def _safetensors():
    try:
        import safetensors.numpy as st
    except ImportError:  # pragma: no cover - exercised where the extra is absent
        raise ImportError("qkern.save/qkern.load need safetensors: pip install 'qkern[checkpoint]'"
                          ) from None
    return st


# -- static metadata <-> JSON ------------------------------------------------------------
def _static_to_json(name, v):
    if name == "layout":
        return dataclasses.asdict(v)
    if name == "dtype":
        return np.dtype(v).name
    if name == "perm":
        return None if v is None else list(v)
    return v


def _static_from_json(name, v):
    if name == "layout":
        v = dict(v)
        v["shape"] = tuple(v["shape"])
        return Layout(**v)
    if name == "dtype":
        return jnp.dtype(v)
    if name == "perm":
        return None if v is None else tuple(v)
    return v


# -- tensors -------------------------------------------------------------------------------
def _put(tensors: dict, name: str, a) -> dict:
    a = np.asarray(jax.device_get(a))
    meta = {"name": name, "dtype": a.dtype.name, "shape": list(a.shape)}
    if a.dtype in _NATIVE:
        tensors[name] = np.ascontiguousarray(a)
    else:  # bfloat16, float8_*: keep the bits
        tensors[name] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        meta["raw"] = True
    return meta


def _get(tensors: dict, meta: dict):
    a = tensors[meta["name"]]
    if meta.get("raw"):
        a = a.view(jnp.dtype(meta["dtype"]))
    return jnp.asarray(a.reshape(meta["shape"]))   # safetensors stores a scalar as [1]


# -- structure -----------------------------------------------------------------------------
def _structure(tree, leaf_ids):
    """The tree's containers as JSON (dicts with str keys, lists, tuples, None), with
    leaves as {"leaf": i}; None when some other pytree node is in the way."""
    if tree is None:
        return {"none": True}
    if isinstance(tree, QArray) or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)):
        return {"leaf": leaf_ids.pop(0)}
    if type(tree) is dict and all(isinstance(k, str) for k in tree):
        keys = sorted(tree)        # jax flattens dicts in sorted key order
        return {"dict": {k: _structure(tree[k], leaf_ids) for k in keys}}
    if type(tree) in (list, tuple):
        return {type(tree).__name__: [_structure(v, leaf_ids) for v in tree]}
    raise _Opaque


class _Opaque(Exception):
    pass


def _rebuild(node, leaves):
    if "leaf" in node:
        return leaves[node["leaf"]]
    if "none" in node:
        return None
    if "dict" in node:
        return {k: _rebuild(v, leaves) for k, v in node["dict"].items()}
    if "list" in node:
        return [_rebuild(v, leaves) for v in node["list"]]
    return tuple(_rebuild(v, leaves) for v in node["tuple"])


# -- public ----------------------------------------------------------------------------------
def save(path: str | os.PathLike, tree: Any) -> None:
    """Write a (quantised) pytree to one safetensors file, bit for bit.

        qkern.save("model.safetensors", qparams)

    Leaves: arrays (any dtype), QArrays (with their static metadata), Python scalars and
    strings. Nested dicts (string keys), lists, tuples and None load without help; a tree
    with other nodes (an Equinox module, a Flax NNX state, dataclasses) loads with
    `qkern.load(path, like=template)`.
    """
    st = _safetensors()
    is_q = lambda v: isinstance(v, QArray)
    leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)
    tensors, entries, seen = {}, [], set()
    for i, (kp, v) in enumerate(leaves_with_path):
        p = path_str(kp) or "."
        if p in seen:                      # two key paths that print alike
            p = f"{p}#{i}"
        seen.add(p)
        if isinstance(v, QArray):
            fields = {f: _put(tensors, f"{p}.{f}", getattr(v, f))
                      for f in _QFIELDS if getattr(v, f) is not None}
            static = {n: _static_to_json(n, getattr(v, n)) for n in _QSTATIC}
            entries.append({"path": p, "kind": "qarray", "fields": fields, "static": static})
        elif isinstance(v, (jax.Array, np.ndarray, np.generic)):
            entries.append({"path": p, "kind": "array", "tensor": _put(tensors, p, v)})
        elif isinstance(v, (bool, int, float, str)):
            entries.append({"path": p, "kind": "py", "value": v})
        else:
            raise TypeError(f"qkern.save: cannot store the leaf {p!r} of type {type(v).__name__}; "
                            "leaves must be arrays, QArrays, or Python scalars/strings.")
    try:
        structure = _structure(tree, list(range(len(entries))))
    except _Opaque:
        structure = None
    header = {"format": FORMAT, "version": VERSION, "qkern": __version__,
              "structure": structure, "leaves": entries}
    st.save_file(tensors, os.fspath(path), metadata={"qkern": json.dumps(header)})


def load(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Read a tree written by `qkern.save`: arrays and QArrays exactly as saved.

        qparams = qkern.load("model.safetensors")
        model = qkern.load("model.safetensors", like=abstract_model)   # custom pytree nodes

    like: a tree with the saved tree's structure (leaves may be anything: arrays,
    `jax.ShapeDtypeStruct`s, QArrays), for trees with nodes other than dicts, lists,
    tuples and None; its key paths must match the saved ones. Raises `CheckpointError` for
    a file qkern did not write or a format version this qkern cannot read.
    """
    st = _safetensors()
    from safetensors import safe_open
    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e}).") from None
    if "qkern" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without qkern metadata; it was not "
                              "written by qkern.save.")
    try:
        header = json.loads(meta["qkern"])
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable qkern metadata ({e}).") from None
    version = header.get("version")
    if header.get("format") != FORMAT or version not in _READS:
            raise CheckpointError(
            f"{path}: qkern checkpoint format version {version!r} (written by qkern "
            f"{header.get('qkern', '?')}); this qkern {__version__} reads version(s) "
            f"{', '.join(map(str, _READS))}. Load it with a matching qkern, or re-save it.")
    tensors = st.load_file(path)
    leaves = []
    for e in header["leaves"]:
        if e["kind"] == "array":
            leaves.append(_get(tensors, e["tensor"]))
        elif e["kind"] == "py":
            leaves.append(e["value"])
        else:
            fields = {f: _get(tensors, m) for f, m in e["fields"].items()}
            static = {n: _static_from_json(n, v) for n, v in e["static"].items()}
            leaves.append(QArray(**fields, **static))
    if like is not None:
        return _into(like, leaves, [e["path"] for e in header["leaves"]], path)
    if header["structure"] is None:
        raise CheckpointError(f"{path}: the saved tree has pytree nodes other than dicts, lists, "
                              "tuples and None; load it with qkern.load(path, like=template).")
    return _rebuild(header["structure"], leaves)


def _into(like, leaves, paths, path):
    is_q = lambda v: isinstance(v, QArray)
    kl, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_q)
    want = [path_str(k) or "." for k, _ in kl]
    if len(want) != len(paths) or any(a != b and not b.startswith(a + "#") for a, b in zip(want, paths)):
        diff = [(a, b) for a, b in zip(want, paths) if a != b][:3]
        raise CheckpointError(
            f"{path}: `like` does not match the saved tree ({len(want)} leaves vs {len(paths)} "
            f"saved; first differences (like, saved): {diff}).")
    return jax.tree_util.tree_unflatten(treedef, leaves)
