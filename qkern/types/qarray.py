"""QArray: a quantised array that behaves like the float array it stands for."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._core import ArrayValue, static_field
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
    pending transpose of the stored layout, and `act_fmt` ("int8": matmuls against this
    weight quantise their activations too and run the W8A8 kernel; None: weight-only).
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

    # -- array protocol ------------------------------------------------------------------
    def aval(self):
        return jax.core.ShapedArray(self.logical_shape, self.dtype)

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
        blocks = "per tensor" if self.layout.per_tensor else (
            f"blocks of {self.block_size} along axis {self.block_axis}")
        act = "" if self.act_fmt is None else f", act_fmt={self.act_fmt}" + (
            ", static act_scale" if self.act_scale is not None else "")
        return (f"QArray({self.fmt}, shape={self.logical_shape}, dtype={np.dtype(self.dtype).name}, "
                f"{blocks}{act})")
