"""`qkern.quantize` and `qkern.dequantize`, for one array or a whole pytree."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._paths import path_str, selector, warn_no_match
from .formats import get_format, quantize_array
from .types.qarray import QArray

_PlainArray = (jax.Array, np.ndarray)


def _is_array(x: Any) -> bool:
    return isinstance(x, _PlainArray) and not isinstance(x, QArray)


def quantize(x: Any, fmt: str = "int8", *, block_size: int | None = None,
             axis: int | None = -2, calibration: Any = "absmax", scale_dtype=None,
             double_quant: bool = False, where: str | Callable | None = None,
             min_size: int = 1024) -> Any:
    """Quantise an array to a `QArray`, or every selected weight of a pytree.

        qw = qkern.quantize(w, "nf4")                                   # one array
        qparams = qkern.quantize(params, "int8", where=r".*kernel")     # a whole model

    fmt: "int8", "int4", "int2".."int7", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "mxfp4",
    "mxfp8" (see docs/formats.md). axis: the block axis, the one matmuls contract over
    (default -2, the `in` axis of an `[in, out]` kernel; axis 0 for a rank-1 array); None
    for one scale per tensor. block_size: elements per scale along `axis` (default: the
    whole axis for int8 and fp8, 128 for int4, 64 for nf4/fp4, 32 for MX); an axis that
    is not a multiple is padded and the logical shape kept. calibration: "absmax",
    "minmax" (zero points, integer formats), "rms" or ("rms", factor), ("fixed", bound) or
    ("fixed", lo, hi). scale_dtype: storage dtype of the scales (default float32).
    double_quant: quantise the scales to 8 bits in blocks of 256, as QLoRA does.

    Pytree form: `where` selects leaves by a regex matched in full against the key path
    ("layers/0/attn/kernel") or a predicate `(path, leaf) -> bool`. Unselected leaves,
    non-floating leaves, leaves of rank < 2 and leaves with fewer than `min_size` elements
    are returned untouched.
    """
    options = dict(block_size=block_size, calibration=calibration, scale_dtype=scale_dtype,
                   double_quant=double_quant)
    get_format(fmt)  # unknown formats and options fail before any work
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))):
        raise TypeError(f"block_size must be an int or None, got {block_size!r}.")
    if scale_dtype is not None and not jnp.issubdtype(scale_dtype, jnp.floating):
        raise TypeError(f"scale_dtype must be a floating dtype (e.g. jnp.bfloat16), got {scale_dtype!r}.")
    if isinstance(x, (np.generic, float, int, complex)):
        raise TypeError(f"qkern.quantize needs an array of rank >= 1 or a pytree of arrays, got the scalar {x!r}.")
    if _is_array(x):
        if where is not None:
            raise TypeError("`where` selects leaves of a pytree; quantize got a single array.")
        return _quantize_one(x, fmt, axis=axis, **options)
    if isinstance(x, QArray):
        raise TypeError(f"{x!r} is already quantised; dequantize it first to re-quantise.")

    select = selector(where)
    matched = []

    def leaf(path, v):
        if not _is_array(v):
            return v
        p = path_str(path)
        if not select(p, v):
            return v
        if not jnp.issubdtype(v.dtype, jnp.floating) or v.ndim < 2 or v.size < min_size:
            return v
        matched.append(p)
        try:
            return _quantize_one(v, fmt, axis=axis, **options)
        except (ValueError, TypeError) as e:
            raise type(e)(f"cannot quantise {p!r} (shape {tuple(v.shape)}, {v.dtype}) to "
                          f"{fmt}: {e}") from None

    out = jax.tree_util.tree_map_with_path(leaf, x, is_leaf=lambda v: isinstance(v, QArray))
    if where is not None and not matched:
        warn_no_match("qkern.quantize", where, x, _is_array,
                      f"quantisable leaf (rank >= 2, >= {min_size} elements, floating)")
    return out


def _quantize_one(w, fmt, *, axis, **options) -> QArray:
    w = jnp.asarray(w)
    default_axis = axis == -2 and w.ndim == 1
    fields = quantize_array(w, fmt, axis=axis, default_axis=default_axis, **options)
    layout = fields.pop("layout")
    return QArray(**fields, fmt=get_format(fmt).name, layout=layout, dtype=np.dtype(w.dtype))


def dequantize(x: Any) -> Any:
    """The float array a QArray stands for (`qw.materialise()`); on a pytree, every QArray."""
    if isinstance(x, QArray):
        return x.materialise()
    return jax.tree_util.tree_map(lambda v: v.materialise() if isinstance(v, QArray) else v,
                                  x, is_leaf=lambda v: isinstance(v, QArray))
