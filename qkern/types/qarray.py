"""QArray: a quantised array that behaves like the float array it stands for."""

from __future__ import annotations

from typing import Any

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .._core import ArrayValue, static_field
from .._core._values import fields_repr, has_array_leaf
from ..formats import Layout, dequantize_array, get_format


class QArray(ArrayValue):
    """A quantised array: packed codes, per-block scales, optional zero points.

    Build one with `qkern.quantize(w, fmt, ...)`; `qkern.dequantize(qw)` (or
    `qw.materialise()`) gives the float array back. Under `qkern.quaxify` it is used like
    the array it stands for: matmuls against it run quantised kernels, transposes,
    dtype casts, reshapes and slices that leave the block axis alone stay quantised, and
    any other operation sees the dequantised array.

    Fields: `data` (codes; two 4-bit codes per byte for 4-bit formats), `scales`,
    `zeros` (minmax zero points, or None), `dq_scale`/`dq_offset` (double quantisation of
    the scales, or None), `act_scale` (a float32 scalar: the static activation scale that
    `qkern.calibrate` records for W8A8, or None for dynamic per-row scales). Static: `fmt`,
    the stored `layout` (shape, block axis, block size), the logical `dtype`, `perm`, a
    pending transpose of the stored layout, `act_fmt` ("int8": matmuls against this
    weight quantise their activations too and run the W8A8 kernel; None: weight-only), and
    `compute_dtype` (bfloat16, float16 or float32: matmuls and convolutions against this
    weight cast x and the decoded weight to it and accumulate in float32, the result keeping
    the dtype dense JAX gives; None: as dense JAX, the widest of x's and the weight's dtype).
    """

    data: jax.Array
    scales: jax.Array
    zeros: Any = None
    dq_scale: Any = None
    dq_offset: Any = None
    act_scale: Any = None
    fmt: str = static_field(default="int8")
    layout: Layout = static_field(default=None)
    dtype: Any = static_field(default=np.dtype("float32"))
    perm: tuple[int, ...] | None = static_field(default=None)
    act_fmt: str | None = static_field(default=None)
    compute_dtype: Any = static_field(default=None)

    # -- array protocol ------------------------------------------------------------------
    def aval(self):
        return jax.core.ShapedArray(self.fitted().logical_shape, self.dtype)

    def fitted(self) -> "QArray":
        """This QArray with its static layout matching the arrays it holds.

        JAX rebuilds a QArray from pieces of its arrays while keeping the static fields:
        `lax.scan` over a stacked QArray hands each step one slice of every field, and
        `shard_map` hands each device its shard. The stored layout still describes the
        whole array then; this derives the piece's own layout from the field shapes, so
        the piece behaves as the smaller QArray it is. Raises where a piece cannot stand
        alone (a shard of a packed 4-bit block axis, a double-quantised slice)."""
        shape = getattr(self.data, "shape", None)
        if shape is None or tuple(shape) == _data_shape(self.layout, self.format):
            return self
        try:
            layout, perm = _fit_layout(self, tuple(shape))
        except _Unfit as e:         # named here, only when raised (fitting is a hot path)
            raise ValueError(
                f"a piece of {self._repr_stored()} with data of shape {tuple(shape)} (a scan "
                "step, a vmap slice or a shard_map shard; the whole array stores "
                f"{_data_shape(self.layout, self.format)}): {e}") from None
        return dataclasses.replace(self, layout=layout, perm=perm)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        s = self.layout.shape
        return s if self.perm is None else tuple(s[p] for p in self.perm)

    @property
    def block_axis(self) -> int | None:
        """The logical axis the blocks run along (the axis matmuls should contract)."""
        if self.layout.per_tensor:
            return None
        a = self.layout.axis
        return a if self.perm is None else self.perm.index(a)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def format(self):
        return get_format(self.fmt)

    def materialise(self) -> jax.Array:
        self = self.fitted()
        out = dequantize_array(self.fmt, self.data, self.scales, self.zeros, self.dq_scale,
                               self.dq_offset, self.layout, self.dtype)
        return out if self.perm is None else jnp.transpose(out, self.perm)

    # -- bookkeeping ---------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of storage: codes, scales, zero points and double-quantisation data."""
        return sum(int(np.prod(np.shape(l))) * np.dtype(l.dtype).itemsize
                   for l in jax.tree_util.tree_leaves(self))

    def bits_per_parameter(self) -> float:
        return 8.0 * self.nbytes() / float(np.prod(self.logical_shape))

    def __repr__(self) -> str:
        try:
            return self.fitted()._repr_stored()
        except Exception:       # noqa: BLE001 - a repr never raises; show what is stored
            return self._repr_stored()

    def _repr_stored(self) -> str:
        """The repr by the stored static fields (never `fitted()`: its error messages
        print the QArray, and must not fit it again)."""
        # Printing never fails: the children may be shapes (`tree_map(lambda a: a.shape,
        # ...)`), None (the trainable half of `qkern.lora.partition`), ShapeDtypeStructs
        # or tracers, and the static fields whatever a pytree function left there.
        try:
            blocks = "per tensor" if self.layout.per_tensor else (
                f"blocks of {self.block_size} along axis {self.block_axis}")
            act = "" if self.act_fmt is None else f", act_fmt={self.act_fmt}" + (
                ", static act_scale" if self.act_scale is not None else "")
            if self.compute_dtype is not None:
                act += f", compute_dtype={np.dtype(self.compute_dtype).name}"
            head = (f"{self.fmt}, shape={self.logical_shape}, "
                    f"dtype={np.dtype(self.dtype).name}, {blocks}{act}")
        except Exception:
            return f"QArray({fields_repr(self, static=True)})"
        if has_array_leaf(self.data) and has_array_leaf(self.scales):
            return f"QArray({head})"
        # not arrays: show what the children are (the optional ones where present)
        shown = tuple(n for n in ("data", "scales", "zeros", "dq_scale", "dq_offset", "act_scale")
                      if n in ("data", "scales") or getattr(self, n) is not None)
        return f"QArray({head}; {fields_repr(self, shown)})"


COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def as_compute_dtype(v, who: str = "compute_dtype") -> np.dtype | None:
    """`compute_dtype` as a NumPy dtype (None stays None); a ValueError naming the dtypes
    that are allowed otherwise."""
    if v is None:
        return None
    try:
        d = np.dtype(jnp.dtype(v))
    except TypeError:
        d = None
    if d is None or d.name not in COMPUTE_DTYPES:
        raise ValueError(f"{who}={v!r}: the compute dtype must be one of "
                         f"{', '.join(COMPUTE_DTYPES)} (or None: as dense JAX).")
    return d


def _data_shape(layout: Layout, fmt) -> tuple[int, ...]:
    """The shape of `data` for a stored layout: the block axis padded, halved when packed."""
    s = list(layout.shape)
    s[layout.axis] = layout.padded // (2 if fmt.packed else 1)
    return tuple(s)


class _Unfit(ValueError):
    """Why a piece of a QArray cannot stand alone (`QArray.fitted` names the piece)."""


def _grown_layout(q: QArray, shape: tuple[int, ...], grow: int
                  ) -> tuple[Layout, tuple[int, ...] | None]:
    """The layout of a stack of QArrays that `jax.vmap` built from per-example ones
    (`jax.vmap(lambda w: qkern.quantize(w, fmt))(ws)`): `grow` new leading axes, each
    example blocked as before. Per-tensor scales do not stack into one per-tensor layout."""
    lay, fmt = q.layout, q.format
    if lay.per_tensor:
        raise _Unfit(f"each of the {shape[:grow]} stacked arrays has its own "
                     "per-tensor scale, which no stacked layout holds; quantise the "
                     "stack at once (qkern.quantize(ws, fmt, axis=None)) or with blocks.")
    lay = dataclasses.replace(lay, shape=tuple(shape[:grow]) + lay.shape, axis=lay.axis + grow)
    if tuple(shape) != _data_shape(lay, fmt) or tuple(jnp.shape(q.scales)) != lay.scale_shape:
        raise _Unfit(f"its data {tuple(shape)} and scales "
                     f"{tuple(jnp.shape(q.scales))} are not a stack of the stored layout "
                     f"{q.layout.shape}.")
    perm = None if q.perm is None else tuple(range(grow)) + tuple(p + grow for p in q.perm)
    return lay, perm


def _fit_layout(q: QArray, shape: tuple[int, ...]) -> tuple[Layout, tuple[int, ...] | None]:
    lay, fmt = q.layout, q.format
    if q.dq_scale is not None:
        raise _Unfit("double-quantised scales are blocked over the whole array and "
                     "cannot be split; quantise without double_quant to scan or shard it.")
    drop = len(lay.shape) - len(shape)
    perm = q.perm
    if drop < 0:
        return _grown_layout(q, shape, -drop)
    if drop and (lay.axis < drop or (
            perm is not None and tuple(perm[:drop]) != tuple(range(drop)))):
        raise _Unfit("only leading stacked axes may be scanned over or mapped "
                     "(jax.vmap with in_axes=0 for the QArray; quantise the weight with "
                     "the mapped axis first, or map over x instead).")
    if drop:
        lay = dataclasses.replace(lay, shape=lay.shape[drop:], axis=lay.axis - drop)
        if perm is not None:       # the stacked axes lead in both orders: renumber the rest
            perm = tuple(p - drop for p in perm[drop:])
            perm = None if perm == tuple(range(len(perm))) else perm
    full = _data_shape(lay, fmt)
    new = list(lay.shape)
    block = lay.block_size
    for ax, (got, want) in enumerate(zip(shape, full)):
        if got == want:
            continue
        if ax != lay.axis:
            new[ax] = got
            continue
        if fmt.packed:
            raise _Unfit(f"{fmt.name} packs the two halves of the block axis "
                         f"(axis {ax}) into one byte, so a shard of that axis cannot be "
                         "decoded alone; shard another axis.")
        if lay.padded != lay.length:
            raise _Unfit(f"the block axis is padded from {lay.length} to "
                         f"{lay.padded}; shard it only when blocks fill it exactly.")
        if lay.per_tensor or lay.num_blocks == 1:
            block = got          # one block (per tensor or per channel): shards share scales
        elif got % block:
            raise _Unfit(f"a shard of the block axis must hold whole blocks of "
                         f"{block}; got {got} rows.")
        new[ax] = got
    return dataclasses.replace(lay, shape=tuple(new), block_size=block), perm
