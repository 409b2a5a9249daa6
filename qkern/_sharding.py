"""Sharding quantised trees: XLA's SPMD partitioner does the distributed work; qkern
says how each QArray's arrays follow the sharding of the weight they stand for.

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    qparams = qkern.shard(qparams, mesh, {"w1": P(None, "model"), "w2": P("model", None)})
    y = jax.jit(qkern.quaxify(model))(qparams, x)            # per device: 1/4 of the bytes

    specs = qkern.partition_specs(qparams, {...})            # shard_map in_specs
    jax.shard_map(qkern.quaxify(body), mesh=mesh, in_specs=(specs, P("data")), ...)

A QArray's specification is the one its dense weight would have (logical axes). Its codes
take it as they are; its scales and zero points take it along every axis they have more
than one entry on (per-block scales split with their blocks); double-quantisation data and
the activation scale are replicated. Inside `shard_map` each device sees a QArray of its
own shard (see `QArray.fitted`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .recipes._paths import path_str
from .types.lora import LoraArray, with_parts
from .types.qarray import QArray


def _is_q(v) -> bool:
    return isinstance(v, QArray)


def qarray_specs(q: QArray, spec: P, mesh=None) -> QArray:
    """A QArray-shaped tree of PartitionSpecs for `q`'s arrays, from the spec of the dense
    weight (logical axes). With `mesh`, checks that block-axis shards hold whole blocks."""
    given, q = q, q.fitted()      # the specs keep `given`'s static fields (same treedef)
    ndim = len(q.logical_shape)
    spec = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    if len(spec) != ndim:
        raise ValueError(f"PartitionSpec {P(*spec)} has {len(spec)} entries for {q!r} of rank {ndim}.")
    stored = [None] * ndim
    for logical, s in enumerate(spec):
        stored[logical if q.perm is None else q.perm[logical]] = s
    lay, fmt = q.layout, q.format
    a = lay.axis
    if stored[a] is not None:
        why = None
        if fmt.packed:
            why = (f"{fmt.name} packs the two halves of the block axis into one byte, so a shard "
                   "of it cannot be decoded alone")
        elif lay.padded != lay.length:
            why = f"the block axis is padded from {lay.length} to {lay.padded}"
        elif q.dq_scale is not None:
            why = "double-quantised scales are blocked over the whole array"
        elif mesh is not None:
            n = _axis_size(mesh, stored[a])
            # One block along the axis (per-tensor or per-channel scales): every shard
            # shares the scales, so any split of the codes works.
            if lay.num_blocks % n and lay.num_blocks != 1:
                why = f"its {lay.num_blocks} blocks of {lay.block_size} do not split into {n} shards"
        if why:
            raise ValueError(f"cannot shard {q!r} along its block axis (spec {P(*spec)}): {why}. "
                             "Shard another axis, or quantise with a layout that allows it.")
    data_spec = P(*stored)

    def follow(arr):
        if arr is None:
            return None
        shape = np.shape(arr)
        return P(*[s if shape[i] > 1 else None for i, s in enumerate(stored)])

    return QArray(data=data_spec, scales=follow(q.scales), zeros=follow(q.zeros),
                  dq_scale=None if q.dq_scale is None else P(),
                  dq_offset=None if q.dq_offset is None else P(),
                  act_scale=None if q.act_scale is None else P(),
                  fmt=given.fmt, layout=given.layout, dtype=given.dtype, perm=given.perm,
                  act_fmt=given.act_fmt, compute_dtype=given.compute_dtype)


def _axis_size(mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names]))


def partition_specs(tree: Any, specs: Any, mesh=None) -> Any:
    """A tree of PartitionSpecs with `tree`'s full structure (QArrays expanded into their
    arrays): for `shard_map` in_specs/out_specs and `NamedSharding`s.

    specs: one PartitionSpec for every array leaf, a tree shaped like `tree` (or a prefix
    of it) with a PartitionSpec (or None: replicated) where each array or QArray is, or
    where a subtree is (it applies to the whole subtree), or a function
    `(path, leaf) -> PartitionSpec | None`. Leaves it does not cover are replicated. A spec shorter than a leaf's rank is padded
    with None; for QArrays it names the dense weight's (logical) axes.
    """
    flat: dict = {}
    if isinstance(specs, P) or specs is None:
        one = specs
        fn = lambda path, v: one
    elif callable(specs) and not isinstance(specs, (dict, list, tuple)):
        fn = specs
    else:
        for kp, s in jax.tree_util.tree_leaves_with_path(
                specs, is_leaf=lambda v: isinstance(v, P) or v is None):
            flat[path_str(kp)] = s

        def fn(path, v):      # the spec at the leaf's path, or at its nearest ancestor
            parts = path.split("/")
            for n in range(len(parts), -1, -1):
                key = "/".join(parts[:n])
                if key in flat:
                    return flat[key]
            return None

    def leaf(kp, v):
        if isinstance(v, LoraArray):
            p = path_str(kp)
            if any(k.startswith(p + "/") for k in flat):     # specs given for its parts
                return jax.tree_util.tree_map_with_path(
                    lambda k2, u: leaf(tuple(kp) + tuple(k2), u), v, is_leaf=_is_q)
            return _lora_specs(v, fn(p, v), mesh)
        s = fn(path_str(kp), v)
        if _is_q(v):
            return qarray_specs(v, P() if s is None else s, mesh)
        if not hasattr(v, "shape"):
            return P()
        s = P() if s is None else s
        if len(tuple(s)) > np.ndim(v):
            s = P(*tuple(s)[-np.ndim(v):]) if np.ndim(v) else P()
        return s

    return jax.tree_util.tree_map_with_path(
        leaf, tree, is_leaf=lambda v: _is_q(v) or isinstance(v, LoraArray))


def _lora_specs(lw: LoraArray, spec, mesh) -> LoraArray:
    """Specs for a LoraArray from the spec of its dense weight [..., in, out]: the base
    takes it, `a` [..., in, r] its leading and `in` entries, `b` [..., r, out] its leading
    and `out` entries; the rank axis is never split. Either half of `qkern.lora.partition`
    (factors only, or base only) gets the specs of the parts it holds."""
    factor = lw.a if lw.a is not None else lw.b
    nd = np.ndim(factor) if factor is not None else len(lw.w.fitted().logical_shape
                                                         if _is_q(lw.w) else np.shape(lw.w))
    s = tuple(P() if spec is None else spec)
    if len(s) > nd:
        raise ValueError(f"PartitionSpec {P(*s)} has {len(s)} entries for a LoraArray of "
                         f"rank {nd}.")
    s = s + (None,) * (nd - len(s))
    lead, s_in, s_out = s[:-2], s[-2], s[-1]
    parts = []
    if _is_q(lw.w) and lw.w.data is None:          # the factors' half keeps a QArray shell
        parts.append(lw.w)
    elif lw.w is not None:
        parts.append(qarray_specs(lw.w, P(*s), mesh) if _is_q(lw.w) else P(*s))
    if lw.a is not None:
        parts.append(P(*lead, s_in, None))
    if lw.b is not None:
        parts.append(P(*lead, None, s_out))
    return with_parts(lw, parts)


def shardings(tree: Any, mesh, specs: Any) -> Any:
    """`partition_specs` as `NamedSharding`s on `mesh`: for `jax.device_put` and
    `jax.jit(in_shardings=..., out_shardings=...)`."""
    ps = partition_specs(tree, specs, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), ps,
                                  is_leaf=lambda v: isinstance(v, P))


def shard(tree: Any, mesh, specs: Any) -> Any:
    """Place `tree` on `mesh`: each array by its spec, each QArray's codes by the dense
    weight's spec and its scales alongside (see `partition_specs`).

        qparams = qkern.shard(qparams, mesh, {"w1": P(None, "model"), "w2": P("model")})
    """
    return jax.device_put(tree, shardings(tree, mesh, specs))


def per_device_bytes(tree: Any) -> dict:
    """Bytes each device holds of `tree`'s arrays (QArrays: codes, scales and the rest)."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for sh in getattr(leaf, "addressable_shards", ()):
            out[sh.device] = out.get(sh.device, 0) + sh.data.nbytes
    return out
