"""LoRA and QLoRA over whole pytrees: add adapters, train only them, merge them back.

    params = qkern.quantize(params, "nf4", where=r".*kernel")            # optional: QLoRA
    params = qkern.loraify(params, rank=8, key=key, where=r".*kernel")
    grads = qkern.lora.grad(loss)(params, batch)       # d loss / d (a, b) of every adapter
    train, frozen = qkern.lora.partition(params)      # a and b of every adapter / the rest
    train = jax.tree_util.tree_map(lambda p, g: p - lr * g, train, grads)   # or optax
    params = qkern.lora.combine(train, frozen)
    merged = qkern.lora.merge(params)                  # plain arrays again
    served = qkern.lora.merge(params, requantize=True) # or re-quantised like each base

`jax.grad(loss)(params, ...)` over a QLoRA tree fails with JAX's "grad requires real- or
complex-valued inputs ... got uint8": a QArray's codes are integers. `qkern.lora.grad` and
`qkern.lora.value_and_grad` differentiate the adapters' factors only. See docs/qlora.md
for a full fine-tuning example.
"""

from __future__ import annotations

import dataclasses
import warnings
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .recipes import quantize as _quantize
from .recipes._paths import path_str, selector, warn_no_match
from .types.lora import LoraArray
from .types.qarray import QArray

__all__ = ["LoraArray", "loraify", "merge", "partition", "combine", "grad", "value_and_grad"]


def _is_weight(v: Any) -> bool:
    if isinstance(v, QArray):
        return len(v.logical_shape) >= 2
    return isinstance(v, (jax.Array, np.ndarray)) and v.ndim >= 2 \
        and jnp.issubdtype(v.dtype, jnp.floating)


def _is_node(v: Any) -> bool:
    return isinstance(v, (QArray, LoraArray))


def loraify(params: Any, rank: int, key: jax.Array, *, where: str | Callable | None = None,
            alpha: float | None = None, dtype: Any = None) -> Any:
    """Wrap selected weights of a pytree in `LoraArray` adapters.

    Selected leaves are floating arrays or QArrays of rank >= 2 ([..., in, out]) whose key
    path ("layers/0/mlp/kernel") matches `where` in full (a regex), or for which `where`
    (a predicate `(path, leaf) -> bool`) is true; None selects every such leaf. Each adapter
    gets its own key (`fold_in(key, i)`), `a` from N(0, 1/in) and `b` zero, so the model's
    outputs are unchanged until training moves `b`. alpha: default `rank` (scale 1).

    Raises ValueError when rank <= 0 or exceeds min(in, out) of a selected leaf (naming
    it); warns, listing the candidate paths, when `where` selects nothing.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"qkern.loraify: rank must be a positive int, got {rank!r}.")
    select = selector(where)
    count = [0]

    def leaf(path, v):
        if isinstance(v, LoraArray) or not _is_weight(v):
            return v
        p = path_str(path)
        if not select(p, v):
            return v
        i, count[0] = count[0], count[0] + 1
        try:
            return LoraArray.init(v, rank, jax.random.fold_in(key, i), alpha=alpha, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise type(e)(f"qkern.loraify: cannot add a rank-{rank} adapter to {p!r}: {e}") from None

    out = jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_node)
    if not count[0]:
        warn_no_match("qkern.loraify", where, params, _is_weight,
                      "weight (floating array or QArray of rank >= 2)")
    return out


def merge(tree: Any, *, requantize: bool | str = False) -> Any:
    """Replace every `LoraArray` by its effective weight `w + (alpha / rank) * a @ b`.

    requantize=False: a plain array in the base's dtype. True: a dense base stays dense, a
    quantised base is re-quantised with its own format, block size, block axis, zero
    points and double quantisation. A format name ("int8", "nf4", ...): every merged
    weight is quantised to that format with its defaults.
    """
    def one(v):
        if not isinstance(v, LoraArray):
            return v
        dense = v.materialise()
        if requantize is False:
            return dense
        if isinstance(requantize, str):
            q = _quantize(dense, requantize)
            base_cd = getattr(v.w, "compute_dtype", None)   # a quantised base's compute dtype
            q = q if base_cd is None else dataclasses.replace(q, compute_dtype=base_cd)
            return _keep_activations(q, v.w)
        if requantize is not True:
            raise TypeError(f"qkern.lora.merge: requantize must be a bool or a format name, "
                            f"got {requantize!r}.")
        if not isinstance(v.w, QArray):
            return dense
        return _requantize_like(dense, v.w)

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda v: isinstance(v, LoraArray))


def _requantize_like(dense: jax.Array, q: QArray) -> QArray:
    q = q.fitted()                  # a scan step's layer: its own layout, not the stack's
    lay = q.layout
    stored = dense if q.perm is None else jnp.transpose(dense, np.argsort(q.perm))
    out = _quantize(stored, q.fmt, block_size=None if lay.per_tensor else lay.block_size,
                    axis=None if lay.per_tensor else lay.axis,
                    calibration="minmax" if q.zeros is not None else "absmax",
                    scale_dtype=(q.scales.dtype if q.dq_scale is None and q.format.kind != "mx"
                                 else None),
                    double_quant=q.dq_scale is not None)
    out = out if q.perm is None else dataclasses.replace(out, perm=q.perm)
    return _keep_activations(dataclasses.replace(out, compute_dtype=q.compute_dtype), q)


def _keep_activations(out: QArray, base) -> QArray:
    """A W8A8 base's activation quantisation (act_fmt and a calibrated act_scale) carried
    to the merged weight when that is int8 too; refused loudly otherwise, never dropped."""
    if getattr(base, "act_fmt", None) is None:
        return out
    if out.fmt != "int8" or out.zeros is not None:
        warnings.warn(f"qkern.lora.merge: the base ran W8A8 (act_fmt={base.act_fmt!r}); the "
                      f"merged {out.fmt} weight cannot, so it runs weight-only.", stacklevel=4)
        return out
    return dataclasses.replace(out, act_fmt=base.act_fmt, act_scale=base.act_scale)


def partition(tree: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees of `tree`'s structure. `trainable` holds the `a` and
    `b` of every LoraArray and None elsewhere; `frozen` holds every other leaf (bases,
    non-adapted weights, integer codes) and None where `trainable` has a leaf (a QArray
    keeps its static fields in both halves, with None for the arrays the other half has).
    Differentiate with respect to `trainable` only, then `combine(trainable, frozen)`;
    `qkern.lora.grad` does this for you."""
    def split(v):
        if not isinstance(v, LoraArray):
            return None, v
        leaves, treedef = jax.tree_util.tree_flatten(v)      # w's leaves, then a, then b
        nw = len(leaves) - 2
        return (jax.tree_util.tree_unflatten(treedef, [None] * nw + leaves[nw:]),
                jax.tree_util.tree_unflatten(treedef, leaves[:nw] + [None, None]))

    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda v: isinstance(v, LoraArray))
    split_leaves = [split(v) for v in leaves]
    return (jax.tree_util.tree_unflatten(treedef, [t for t, _ in split_leaves]),
            jax.tree_util.tree_unflatten(treedef, [f for _, f in split_leaves]))


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`: take each leaf from whichever tree has it."""
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                  is_leaf=lambda v: v is None)


# -- gradients with respect to the adapters ---------------------------------------------------
def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0,
                   has_aux: bool = False) -> Callable:
    """`jax.value_and_grad` for trees holding `LoraArray`s: differentiate the adapters only.

        loss, grads = qkern.lora.value_and_grad(loss_fn)(params, batch)
        train, frozen = qkern.lora.partition(params)
        updates, opt_state = optimiser.update(grads, opt_state, train)     # optax
        params = qkern.lora.combine(optax.apply_updates(train, updates), frozen)

    The argument(s) at `argnums` are split with `partition`, and `fun` is called with the
    tree put back together (`combine`), so it takes the whole tree as before (wrap the
    model in `qkern.quaxify` as usual). Only the `a` and `b` of every LoraArray are
    differentiated: bases (dense or QArray, whose integer codes `jax.grad` refuses) and
    every leaf outside an adapter are constants.

    Returns `(value, grads)` (`((value, aux), grads)` with has_aux), where `grads` has the
    structure of the trainable half, `qkern.lora.partition(arg)[0]`: the tree's containers
    with a LoraArray (gradients in `a` and `b`; its base emptied: None, or a QArray whose
    arrays are None) at every adapter, and None at every other leaf; a tuple of such trees when `argnums` is a tuple. Apply it to the
    trainable half, as above. Works under `jax.jit`. Raises ValueError when a
    differentiated argument holds no LoraArray.
    """
    single = not isinstance(argnums, (tuple, list))
    nums = (argnums,) if single else tuple(argnums)
    for i in nums:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"qkern.lora.value_and_grad: argnums must be an int or a tuple of "
                            f"ints, got {argnums!r}.")
    name = getattr(fun, "__name__", "fun")

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        try:
            pos = [range(len(args))[i] for i in nums]     # negative argnums too
        except IndexError:
            raise TypeError(f"qkern.lora.value_and_grad({name}): argnums={argnums!r} but "
                            f"{len(args)} positional argument(s) given.") from None
        halves = [partition(args[i]) for i in pos]
        for i, (train, _) in zip(pos, halves):
            if not jax.tree_util.tree_leaves(train):
                raise ValueError(
                    f"qkern.lora.value_and_grad({name}): argument {i} holds no LoraArray, so "
                    "there is nothing to train; add adapters with qkern.loraify, or use "
                    "jax.grad for a tree of plain float arrays.")

        def on_trainable(*trains):
            full = list(args)
            for i, t, (_, frozen) in zip(pos, trains, halves):
                full[i] = combine(t, frozen)
            return fun(*full, **kwargs)

        value, grads = jax.value_and_grad(on_trainable, argnums=tuple(range(len(pos))),
                                          has_aux=has_aux)(*(t for t, _ in halves))
        return value, grads[0] if single else grads

    return wrapped


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """`jax.grad` for trees holding `LoraArray`s: the gradient with respect to the adapters'
    `a` and `b` only, shaped like `qkern.lora.partition(arg)[0]` (the trainable half); with
    has_aux, `(grads, aux)`. See `value_and_grad` for the details and how to apply it.

        grads = qkern.lora.grad(loss_fn)(params, batch)
    """
    vg = value_and_grad(fun, argnums=argnums, has_aux=has_aux)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        value, grads = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapped
