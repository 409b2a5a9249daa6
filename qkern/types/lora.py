"""LoraArray: a frozen weight plus a trainable low-rank update, used like one array."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._core import ArrayValue, Value, static_field
from .._core._values import describe_leaf, fields_repr, has_array_leaf
from .qarray import QArray


def _shape(x) -> tuple[int, ...]:
    if isinstance(x, QArray):   # a scan step's or shard's piece has its own, smaller shape
        return tuple(x.fitted().logical_shape)
    return tuple(x.shape) if has_array_leaf(x) else tuple(np.shape(x))


def _as_array(name: str, x: Any) -> Any:
    """A field as an array: arrays, tracers, ShapeDtypeStructs and QArrays as they are,
    array-likes (lists, tuples, scalars) through `jnp.asarray`, as jnp functions take them."""
    if isinstance(x, QArray) and name == "w":
        return x
    if isinstance(x, Value):
        raise TypeError(f"LoraArray: {name} must be an array{' or a QArray' if name == 'w' else ''}, "
                        f"got a {type(x).__name__}.")
    if has_array_leaf(x):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"LoraArray: {name} must be an array or array-like (a nested list of "
                        f"numbers), got {describe_leaf(x)} ({e}).") from None


def _well_formed(x: Any) -> bool:
    if isinstance(x, QArray):
        return has_array_leaf(x.data) and has_array_leaf(x.scales)
    return has_array_leaf(x)


class LoraArray(ArrayValue):
    """The weight `w + (alpha / rank) * a @ b`, without ever forming it.

        lw = qkern.LoraArray(w, a, b, alpha=16.0)        # w [in, out], a [in, r], b [r, out]
        lw = qkern.LoraArray.init(w, rank=8, key=key)    # a ~ N(0, 1/in), b = 0
        y = qkern.quaxify(lambda x, w: x @ w)(x, lw)     # x @ w + (alpha/r) * (x @ a) @ b

    `w` is a dense array or a `QArray` (QLoRA) and is frozen: it gets no gradient (a zero
    cotangent). Gradients flow to `a` and `b`. Matmuls in any operand position, transposes
    and dtype casts keep the low-rank form; with a quantised `w`, a matmul runs one fused
    kernel for the base and the update. Leading axes are allowed (w [..., in, out],
    a [..., in, r], b [..., r, out]), e.g. a stack of layers sliced by `lax.scan`.

    Fields: `w`, `a`, `b`; static `alpha` (a float; the update is scaled by alpha / rank).
    """

    w: Any
    a: jax.Array
    b: jax.Array
    alpha: float = static_field(default=None)

    def __post_init__(self):
        for name in ("w", "a", "b"):
            object.__setattr__(self, name, _as_array(name, getattr(self, name)))
        ws, as_, bs = _shape(self.w), _shape(self.a), _shape(self.b)
        if len(ws) < 2:
            raise ValueError(f"LoraArray: w must have rank >= 2 ([..., in, out]), got shape {ws}.")
        if len(as_) != len(ws) or len(bs) != len(ws):
            raise ValueError(f"LoraArray: a {as_} and b {bs} must have the rank of w {ws} "
                             "([..., in, r] and [..., r, out]).")
        lead, (din, dout), r = ws[:-2], ws[-2:], as_[-1]
        if as_ != (*lead, din, r) or bs != (*lead, r, dout):
            raise ValueError(f"LoraArray: shapes do not fit: w {ws} needs a [..., {din}, r] and "
                             f"b [..., r, {dout}] with the same r; got a {as_}, b {bs}.")
        if r <= 0 or r > min(din, dout):
            raise ValueError(f"LoraArray: rank {r} must be in 1..min(in, out) = {min(din, dout)} "
                             f"for w of shape {ws}.")
        for name in ("a", "b"):
            dt = getattr(self, name).dtype
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(f"LoraArray: {name} must be floating, got {dt}.")
        alpha = float(r) if self.alpha is None else self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
            raise TypeError(f"LoraArray: alpha must be a Python number (static), got {alpha!r}.")
        object.__setattr__(self, "alpha", float(alpha))

    @classmethod
    def init(cls, w: Any, rank: int, key: jax.Array, *, alpha: float | None = None,
             dtype: Any = None) -> "LoraArray":
        """A fresh adapter on `w`: `a` from N(0, 1/in), `b` zero (the LoRA paper's start, so
        the effective weight starts equal to `w`). dtype: of a and b (default: float32 for a
        quantised w, else w's dtype). alpha defaults to the rank (scale 1)."""
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise TypeError(f"LoraArray.init: rank must be an int, got {rank!r}.")
        ws = _shape(w)
        if len(ws) < 2:
            raise ValueError(f"LoraArray.init: w must have rank >= 2 ([..., in, out]), got {ws}.")
        lead, (din, dout) = ws[:-2], ws[-2:]
        if rank <= 0 or rank > min(din, dout):
            raise ValueError(f"LoraArray.init: rank {rank} must be in 1..min(in, out) = "
                             f"{min(din, dout)} for w of shape {ws}.")
        if dtype is None:
            dtype = jnp.float32 if isinstance(w, QArray) else jnp.result_type(w)
        a = jax.random.normal(key, (*lead, din, rank), dtype) / math.sqrt(din)
        b = jnp.zeros((*lead, rank, dout), dtype)
        return cls(w, a, b, alpha=alpha)

    # -- array protocol ------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def aval(self):
        return jax.core.ShapedArray(_shape(self.w), self.w.dtype)

    def base(self) -> jax.Array:
        """The frozen base as a dense array, behind a gradient stop."""
        w = self.w.materialise() if isinstance(self.w, QArray) else self.w
        return jax.lax.stop_gradient(w)

    def materialise(self) -> jax.Array:
        w = self.base()
        ab = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (w.astype(jnp.float32) + self.scale * ab).astype(w.dtype)

    def __repr__(self) -> str:
        # Printing never fails: `qkern.lora.partition` leaves None for the factors (frozen
        # half) or the base (trainable half), `tree_map(lambda a: a.shape, ...)` shapes.
        if all(_well_formed(v) for v in (self.w, self.a, self.b)):
            try:
                kind = f"QArray({self.w.fmt})" if isinstance(self.w, QArray) else "dense"
                return (f"LoraArray(shape={_shape(self.w)}, dtype={np.dtype(self.w.dtype).name}, "
                        f"base={kind}, rank={self.rank}, alpha={self.alpha})")
            except Exception:
                pass
        return f"LoraArray({fields_repr(self)}, alpha={self.alpha!r})"


def with_parts(lw: LoraArray, parts: list) -> LoraArray:
    """`lw` rebuilt from `parts`: one object for each of its present fields, in the order
    w, a, b, where a QArray base counts as one part (not its arrays). For pytree-shaped
    results per part (specs, a re-quantised base) without unpacking the QArray."""
    _, treedef = jax.tree_util.tree_flatten(lw, is_leaf=lambda x: x is not lw
                                            and isinstance(x, QArray))
    return jax.tree_util.tree_unflatten(treedef, parts)
