"""Checkpoints of quantised trees: `qkern.save(path, tree)` and `qkern.load(path)`.

    qparams = qkern.quantize(params, rules=rules)
    qkern.save("model.safetensors", qparams)
    qparams = qkern.load("model.safetensors")            # bit for bit, metadata included

One safetensors file (the `checkpoint` extra: `pip install qkern[checkpoint]`): every
array is a tensor named by its key path ("layers/0/attn/kernel.data"), and the header's
metadata holds the tree's structure (LoraArrays included, with their alpha) and each
QArray's static fields (format, layout, dtype, pending transpose, activation format) as
JSON, with a format version. Arrays whose dtype safetensors' numpy API lacks (bfloat16,
fp8) are stored as their raw bytes. Loading checks the header and each QArray's metadata
against its arrays, so a damaged file fails at load, naming the leaf.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .recipes._paths import path_str
from ._version import __version__
from .formats import Layout, get_format
from .recipes._rule import ACT_FORMATS
from .types.lora import LoraArray
from .types.qarray import QArray, _data_shape, as_compute_dtype

FORMAT = "qkern.checkpoint"
# Bump when the layout of the header or tensors changes. A file is written with the
# lowest version that holds its tree, so earlier qkern versions read what they can:
# 1: dicts, lists, tuples, None, arrays, QArrays, Python scalars; 2: LoraArray nodes too;
# 3: QArrays with a `compute_dtype` too.
VERSION = 3                    # the newest; this qkern reads every version up to it
_READS = tuple(range(1, VERSION + 1))

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
    if name in ("dtype", "compute_dtype"):
        return None if v is None else np.dtype(v).name
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
    if name == "compute_dtype":
        return as_compute_dtype(v)
    if name == "perm":
        return None if v is None else tuple(v)
    return v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _qarray(fields: dict, static_json: dict) -> QArray:
    """A QArray from a checkpoint entry, its metadata checked against its arrays; a
    ValueError saying what does not fit (the caller names the file and leaf)."""
    # compute_dtype came later: checkpoints written before it have none (as dense JAX)
    static_json = {"compute_dtype": None, **static_json}
    if set(static_json) != set(_QSTATIC):
        raise ValueError(f"static fields {sorted(static_json)}, expected {sorted(_QSTATIC)}")
    shell = not fields        # the trainable half of qkern.lora.partition: no arrays
    if not shell and not {"data", "scales"} <= set(fields) <= set(_QFIELDS):
        raise ValueError(f"arrays {sorted(fields)}: needs data and scales, may have "
                         f"{', '.join(_QFIELDS)}")
    fmt = get_format(static_json["fmt"])
    lay = static_json["layout"]
    keys = {f.name for f in dataclasses.fields(Layout)}
    if not isinstance(lay, dict) or set(lay) != keys:
        raise ValueError(f"layout {lay!r} needs the keys {sorted(keys)}")
    shape, axis, block = lay["shape"], lay["axis"], lay["block_size"]
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"layout shape {shape!r} is not a list of sizes")
    if not _is_int(axis) or not 0 <= axis < len(shape):
        raise ValueError(f"layout axis {axis!r} is not an axis of shape {tuple(shape)}")
    if not _is_int(block) or block <= 0:
        raise ValueError(f"layout block_size {block!r} is not a positive int")
    if not all(isinstance(lay[k], bool) for k in ("per_tensor", "even_blocks")):
        raise ValueError(f"layout per_tensor/even_blocks {lay['per_tensor']!r}, "
                         f"{lay['even_blocks']!r} are not bools")
    static = {n: _static_from_json(n, v) for n, v in static_json.items()}
    if not jnp.issubdtype(static["dtype"], jnp.floating):
        raise ValueError(f"dtype {static_json['dtype']!r} is not a floating dtype")
    perm = static["perm"]
    if perm is not None and sorted(perm) != list(range(len(shape))):
        raise ValueError(f"perm {static_json['perm']!r} is not a permutation of the "
                         f"{len(shape)} axes")
    if static["act_fmt"] not in (None, *ACT_FORMATS):
        raise ValueError(f"act_fmt {static['act_fmt']!r} is not one of None, "
                         f"{', '.join(ACT_FORMATS)}")
    if static["act_fmt"] is not None and static["compute_dtype"] is not None:
        raise ValueError(f"act_fmt {static['act_fmt']!r} and compute_dtype "
                         f"{static['compute_dtype'].name!r} together (W8A8 has no compute dtype)")
    layout = static["layout"]
    want = {"data": _data_shape(layout, fmt), "scales": layout.scale_shape,
            "zeros": layout.scale_shape}
    for name, shape_ in want.items():
        if name in fields and tuple(fields[name].shape) != tuple(shape_):
            raise ValueError(f"{name} has shape {tuple(fields[name].shape)} but the layout "
                             f"(shape {layout.shape}, axis {layout.axis}, block_size "
                             f"{layout.block_size}, {fmt.name}) needs {tuple(shape_)}")
    if shell:
        return QArray(data=None, scales=None, **static)
    _check_dtypes(fields, fmt)
    return QArray(**fields, **static)


def _check_dtypes(fields: dict, fmt) -> None:
    """Each array has the dtype `fmt` stores, so a header naming the wrong format (or a
    file written by something else) is refused instead of decoding bytes as other codes."""
    if fmt.packed:
        data = ("uint8",)                                  # two 4-bit codes per byte
    elif fmt.byte_floats:                                  # float8 bit patterns; older files
        data = ("uint8", jnp.dtype(fmt.float_dtype).name)  # stored the float8 arrays
    else:
        data = ("int8",)
    want = {"data": data, "zeros": ("int8",)}
    if fmt.kind == "mx":
        want["scales"] = ("uint8",)                        # E8M0 exponents
    elif "dq_scale" in fields:
        want["scales"] = ("int8",)                         # double-quantised scales
    for name, a in fields.items():
        dtype = jnp.dtype(a.dtype)
        if name in want and dtype.name not in want[name]:
            raise ValueError(f"{name} is {dtype.name}, but {fmt.name} stores {name} as "
                             f"{' or '.join(want[name])}")
        if name not in want and not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} is {dtype.name}, but {fmt.name} stores {name} as a "
                             "floating dtype")


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
def _structure(tree, leaf_ids, kinds: set):
    """The tree's containers as JSON (dicts with str keys, lists, tuples, None, LoraArrays
    as {"lora": {"w", "a", "b"}, "alpha"}), with leaves as {"leaf": i}; raises _Opaque
    when some other pytree node is in the way. Adds the node kinds used to `kinds`."""
    if tree is None:
        return {"none": True}
    if isinstance(tree, QArray) or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)):
        return {"leaf": leaf_ids.pop(0)}
    if isinstance(tree, LoraArray):    # children in flattening order: w, a, b
        kinds.add("lora")
        return {"lora": {n: _structure(getattr(tree, n), leaf_ids, kinds) for n in ("w", "a", "b")},
                "alpha": tree.alpha}
    if type(tree) is dict and all(isinstance(k, str) for k in tree):
        keys = sorted(tree)        # jax flattens dicts in sorted key order
        return {"dict": {k: _structure(tree[k], leaf_ids, kinds) for k in keys}}
    if type(tree) in (list, tuple):
        return {type(tree).__name__: [_structure(v, leaf_ids, kinds) for v in tree]}
    raise _Opaque


class _Opaque(Exception):
    pass


def _shell(cls, **fields):
    """A Value with these fields, unchecked: what JAX's unflatten builds for the halves of
    `qkern.lora.partition` (None where the other half has the arrays)."""
    obj = object.__new__(cls)
    for n, v in fields.items():
        object.__setattr__(obj, n, v)
    return obj


def _rebuild(node, leaves, where: str = ""):
    """The tree from its JSON structure; a ValueError (with the path where) when the
    structure is malformed. (A QArray without arrays is a legitimate leaf: the trainable
    half of `qkern.lora.partition` keeps every QArray's static fields that way.)"""
    at = where or "the root"
    if not isinstance(node, dict) or len(node) != (2 if "lora" in node else 1):
        raise ValueError(f"unreadable structure at {at}: {node!r}"[:300])
    sub = lambda k: f"{where}/{k}" if where else str(k)   # noqa: E731
    if "leaf" in node:
        i = node["leaf"]
        if not _is_int(i) or not 0 <= i < len(leaves):
            raise ValueError(f"structure at {at} refers to leaf {i!r}; there are {len(leaves)}")
        return leaves[i]
    if "none" in node:
        return None
    if "dict" in node:
        return {k: _rebuild(v, leaves, sub(k)) for k, v in node["dict"].items()}
    if "list" in node:
        return [_rebuild(v, leaves, sub(i)) for i, v in enumerate(node["list"])]
    if "tuple" in node:
        return tuple(_rebuild(v, leaves, sub(i)) for i, v in enumerate(node["tuple"]))
    if "lora" in node:
        parts = {n: _rebuild(node["lora"][n], leaves, sub(n)) for n in ("w", "a", "b")}
        if (isinstance(parts["w"], QArray) and parts["w"].data is None
                and (parts["a"] is None or parts["b"] is None)):
            raise ValueError(f"the LoraArray at {at} has neither its base's arrays nor both "
                             "factors")
        if any(v is None for v in parts.values()):
            # a half from qkern.lora.partition (None for the base or the factors)
            return _shell(LoraArray, **parts, alpha=node["alpha"])
        try:
            return LoraArray(**parts, alpha=node["alpha"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"the LoraArray at {at} does not fit together: {e}") from None
    raise ValueError(f"unreadable structure at {at}: unknown node {sorted(node)}")


# -- public ----------------------------------------------------------------------------------
def save(path: str | os.PathLike, tree: Any) -> None:
    """Write a (quantised) pytree to one safetensors file, bit for bit.

        qkern.save("model.safetensors", qparams)

    Leaves: arrays (any dtype), QArrays (with their static metadata), Python scalars and
    strings. Nested dicts (string keys), lists, tuples, None and LoraArrays (dense or
    QArray base) load without help; a tree with other nodes (an Equinox module, a Flax NNX
    state, dataclasses) loads with `qkern.load(path, like=template)`.
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
            v = v.fitted()         # a vmap-built stack or a scan piece: its own layout
            fields = {f: _put(tensors, f"{p}.{f}", getattr(v, f))
                      for f in _QFIELDS if getattr(v, f) is not None}
            # compute_dtype is written only when set: files without it stay readable by
            # qkern versions from before it
            static = {n: _static_to_json(n, getattr(v, n)) for n in _QSTATIC
                      if n != "compute_dtype" or v.compute_dtype is not None}
            entries.append({"path": p, "kind": "qarray", "fields": fields, "static": static})
        elif isinstance(v, (jax.Array, np.ndarray, np.generic)):
            entries.append({"path": p, "kind": "array", "tensor": _put(tensors, p, v)})
        elif isinstance(v, (bool, int, float, str)):
            entries.append({"path": p, "kind": "py", "value": v})
        else:
            raise TypeError(f"qkern.save: cannot store the leaf {p!r} of type {type(v).__name__}; "
                            "leaves must be arrays, QArrays, or Python scalars/strings.")
    kinds: set = set()
    try:
        structure = _structure(tree, list(range(len(entries))), kinds)
    except _Opaque:
        structure = None
    # the lowest version that holds it (without a structure, `like=` rebuilds any tree)
    version = 2 if "lora" in kinds and structure is not None else 1
    if any("compute_dtype" in e.get("static", {}) for e in entries):
        version = 3            # earlier qkern versions would not know the field
    header = {"format": FORMAT, "version": version, "qkern": __version__,
              "structure": structure, "leaves": entries}
    st.save_file(tensors, os.fspath(path), metadata={"qkern": json.dumps(header)})


def load(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Read a tree written by `qkern.save`: arrays and QArrays exactly as saved.

        qparams = qkern.load("model.safetensors")
        model = qkern.load("model.safetensors", like=abstract_model)   # custom pytree nodes

    like: a tree with the saved tree's structure (leaves may be anything: arrays,
    `jax.ShapeDtypeStruct`s, QArrays), for trees with nodes other than dicts, lists,
    tuples, None and LoraArrays; its key paths must match the saved ones. Raises
    FileNotFoundError for a missing file, and `CheckpointError` (a ValueError) for a file
    qkern did not write, a format version this qkern cannot read, or a damaged header
    (naming the leaf whose entry or QArray metadata does not fit its arrays).
    """
    st = _safetensors()
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "qkern.load: no checkpoint file at this path",
                                path)
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
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qkern checkpoint: its qkern metadata has no "
                              f"format {FORMAT!r}.")
    version = header.get("version")
    if version not in _READS:
        raise CheckpointError(
            f"{path}: qkern checkpoint format version {version!r} (written by qkern "
            f"{header.get('qkern', '?')}); this qkern {__version__} reads version(s) "
            f"{', '.join(map(str, _READS))}. Load it with a matching qkern, or re-save it.")
    missing = [k for k in ("leaves", "structure") if k not in header]
    if missing or not isinstance(header["leaves"], list):
        what = (f"has no {' or '.join(map(repr, missing))}" if missing
                else "has a 'leaves' that is not a list")
        raise CheckpointError(f"{path}: not a qkern checkpoint: its qkern header {what} "
                              "(a damaged file, or one not written by qkern.save).")
    tensors = st.load_file(path)
    leaves = [_leaf(e, i, tensors, path) for i, e in enumerate(header["leaves"])]
    paths = [e["path"] for e in header["leaves"]]
    if like is not None:
        return _into(like, leaves, paths, path)
    if header["structure"] is None:
        raise CheckpointError(f"{path}: the saved tree has pytree nodes other than dicts, lists, "
                              "tuples, None and LoraArrays; load it with "
                              "qkern.load(path, like=template).")
    try:
        return _rebuild(header["structure"], leaves)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = str(e) if isinstance(e, ValueError) else f"unreadable structure ({type(e).__name__}: {e})"
        raise CheckpointError(f"{path}: damaged checkpoint: {what}.") from None


def _leaf(e, i: int, tensors: dict, path: str):
    """Leaf `i` from its header entry; CheckpointError naming the file and leaf when the
    entry is malformed or does not fit its arrays."""
    name = e.get("path", f"#{i}") if isinstance(e, dict) else f"#{i}"
    try:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise ValueError(f"entry {e!r}"[:200] + " has no path")
        kind = e.get("kind")
        if kind == "array":
            return _get(tensors, e["tensor"])
        if kind == "py":
            return e["value"]
        if kind == "qarray":
            fields = {f: _get(tensors, m) for f, m in e["fields"].items()}
            return _qarray(fields, e["static"])
        raise ValueError(f"unknown kind {kind!r}")
    except KeyError as err:
        raise CheckpointError(f"{path}: damaged checkpoint: leaf {name!r}: missing "
                              f"{err}.") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint: leaf {name!r}: {err}.") from None


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
