"""`qkern.quantize` and `qkern.dequantize`, for one array or a whole pytree (by rules),
rounding to nearest or, with `gptq=`, through `_gptq_driver`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..formats import get_format, parse_calibration, quantize_array
from ..formats._quantize import check_options, make_layout, refuse_nonfinite
from ..types.qarray import QArray, as_compute_dtype
from ._gptq_core import GPTQ
from ._gptq_driver import gptq_one, gptq_tree
from ._paths import path_str, selector, warn_no_match
from ._rule import (QuantReport, ReportRow, Rule, choose_rule, is_plain_array, map_weights,
                    nbytes)


def quantize(x: Any, fmt: str | None = None, *, block_size: int | None = None,
             axis: int | None = -2, calibration: Any = "absmax", scale_dtype=None,
             double_quant: bool = False, where: str | Callable | None = None,
             min_size: int = 1024, act_fmt: str | None = None, compute_dtype: Any = None,
             rules: Sequence[Rule] | None = None, report: bool = False, gptq: Any = None) -> Any:
    """Quantise an array to a `QArray`, or every selected weight of a pytree.

        qw = qkern.quantize(w, "nf4")                                   # one array
        qparams = qkern.quantize(params, "int8", where=r".*kernel")     # a whole model
        qparams, rep = qkern.quantize(params, rules=[                   # a recipe
            qkern.Rule(where=r".*attn.*kernel", fmt="nf4", block_size=64),
            qkern.Rule(where=r".*mlp.*", fmt="int8"),
        ], report=True)
        print(rep)                                                      # path, format, bytes

    fmt: "int8" (the default), "int4", "int2".."int7", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2",
    "mxfp4", "mxfp8" (see docs/formats.md). axis: the block axis, the one matmuls contract
    over (default -2, the `in` axis of an `[in, out]` kernel; axis 0 for a rank-1 array);
    None for one scale per tensor. block_size: elements per scale along `axis` (default: the
    whole axis for int8 and fp8, 128 for int4, 64 for nf4/fp4, 32 for MX); an axis that
    is not a multiple is padded and the logical shape kept. calibration: "absmax",
    "minmax" (zero points, integer formats), "rms" or ("rms", factor), ("fixed", bound) or
    ("fixed", lo, hi). scale_dtype: storage dtype of the scales (default float32).
    double_quant: quantise the scales to 8 bits in blocks of 256, as QLoRA does.
    act_fmt: "int8" makes matmuls against the weight quantise their activations too (W8A8;
    needs fmt="int8", symmetric); see `qkern.calibrate` for static activation scales.
    compute_dtype: "bfloat16", "float16" or "float32": matmuls and convolutions against
    the weight cast x and the decoded weight to it (float32 accumulation; the result keeps
    dense JAX's dtype), as bitsandbytes' compute dtype. None (default): as dense JAX. On a
    CPU with AMX, bfloat16 runs large-M matmuls 2-5x faster than float32 (docs/formats.md).

    Pytree form: `where` selects leaves by a regex matched in full against the key path
    ("layers/0/attn/kernel") or a predicate `(path, leaf) -> bool`. Unselected leaves,
    non-floating leaves, leaves of rank < 2 and leaves with fewer than `min_size` elements
    are returned untouched.

    Rules form (`rules=[qkern.Rule(...), ...]`, instead of fmt/where): each floating leaf
    takes the first rule whose `where` matches it; `Rule(fmt=None)` keeps it dense. A rule
    that quantises nothing warns with the available paths; a format that does not fit a
    leaf raises, naming the leaf, the rule and the reason. `report=True` returns
    `(tree, qkern.QuantReport)`, which prints as a table.

    gptq: choose the codes with GPTQ instead of rounding to nearest (same formats and
    storage): a `qkern.Hessians` from `qkern.hessians(fn, params, batches)` (or a dict of
    path -> [K, K] array; one [K, K] array for a single weight), or `qkern.GPTQ(hessians,
    damp=..., act_order=...)`. Every leaf quantised must have its Hessian. See docs/gptq.md.
    """
    if rules is not None:
        if (fmt is not None or where is not None or act_fmt is not None
                or compute_dtype is not None):
            raise TypeError("qkern.quantize: give either `rules=` or `fmt`/`where`/`act_fmt`/"
                            "`compute_dtype`, not both (put the format, the selection and "
                            "those options in the rules).")
        rules = tuple(rules)
        for i, r in enumerate(rules):
            if not isinstance(r, Rule):
                raise TypeError(f"rules[{i}] is {r!r}; rules must be qkern.Rule(...) objects.")
        if is_plain_array(x) or isinstance(x, (np.generic, float, int, complex)):
            raise TypeError("`rules` select leaves of a pytree; quantize got a single array "
                            "(use qkern.quantize(w, fmt, ...) for one array).")
    fmt = "int8" if fmt is None and rules is None else fmt
    if rules is None:
        get_format(fmt)  # unknown formats and options fail before any work
        if act_fmt is not None or compute_dtype is not None:
            Rule(fmt=fmt, act_fmt=act_fmt, calibration=calibration,   # the same checks
                 compute_dtype=compute_dtype)
    check_options(None, block_size=block_size, axis=axis, scale_dtype=scale_dtype)
    if isinstance(x, (np.generic, float, int, complex)):
        raise TypeError(f"qkern.quantize needs an array of rank >= 1 or a pytree of arrays, got the scalar {x!r}.")
    if gptq is not None:
        gptq = gptq if isinstance(gptq, GPTQ) else GPTQ(gptq)
    if is_plain_array(x):
        if where is not None:
            raise TypeError("`where` selects leaves of a pytree; quantize got a single array.")
        if report:
            raise TypeError("report=True applies to the pytree form of qkern.quantize.")
        if gptq is not None:
            return gptq_one(x, fmt, gptq, axis=axis, block_size=block_size,
                             calibration=calibration, scale_dtype=scale_dtype,
                             double_quant=double_quant, act_fmt=act_fmt,
                             compute_dtype=compute_dtype)
        return _quantize_one(x, fmt, axis=axis, block_size=block_size, calibration=calibration,
                             scale_dtype=scale_dtype, double_quant=double_quant, act_fmt=act_fmt,
                             compute_dtype=compute_dtype)
    if isinstance(x, QArray):
        raise TypeError(f"{x!r} is already quantised; dequantize it first to re-quantise.")

    legacy = rules is None
    if legacy:
        rules = (Rule(where=where, fmt=fmt, block_size=block_size, axis=axis,
                      calibration=calibration, scale_dtype=scale_dtype,
                      double_quant=double_quant, act_fmt=act_fmt, compute_dtype=compute_dtype,
                      min_size=min_size),)
    out, rep, used = apply_rules(x, rules, name_rules=not legacy, gptq=gptq)
    for i, r in enumerate(rules):
        if used[i] or (legacy and where is None):
            continue
        if r.fmt is None:
            what = "floating leaf (to keep dense)"
            candidate = lambda v: is_plain_array(v) and jnp.issubdtype(v.dtype, jnp.floating)
        else:
            what = f"quantisable leaf (rank >= 2, >= {r.min_size} elements, floating)"
            candidate = is_plain_array if legacy else (lambda v, r=r: _quantisable(v, r.min_size))
        who = "qkern.quantize" if legacy else f"qkern.quantize: rules[{i}] {r.describe()}"
        if not legacy and any(r is not s for s in rules[:i]):
            what += " not already claimed by an earlier rule"
        warn_no_match(who, r.where, x, candidate, what)
    return (out, rep) if report else out


def _quantisable(v, min_size: int) -> bool:
    return (is_plain_array(v) and jnp.issubdtype(v.dtype, jnp.floating) and v.ndim >= 2
            and v.size >= min_size)


def apply_rules(tree: Any, rules: Sequence[Rule], name_rules: bool = True, gptq: Any = None):
    """(quantised tree, QuantReport, [whether rule i quantised (or, fmt=None, kept) a leaf])."""
    selects = [selector(r.where) for r in rules]
    used = [False] * len(rules)
    rows = []
    if gptq is not None:      # all GPTQ leaves first, batched by shape and format
        gptq_done = gptq_tree(tree, rules, gptq)

    def leaf(path, v):
        if isinstance(v, QArray):
            p = path_str(path)
            rows.append(ReportRow(p, tuple(v.shape), np.dtype(v.dtype).name, v.fmt, None,
                                  int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize,
                                  nbytes(v), "already quantised"))
            return v
        if not is_plain_array(v):
            return v
        p = path_str(path)
        row = functools.partial(ReportRow, p, tuple(v.shape), np.dtype(v.dtype).name)
        size = nbytes(v)
        i, why = choose_rule(p, v, rules, selects)
        if why is not None:
            if why == "kept dense by rule":
                used[i] = True
            rows.append(row(None, i, size, size, why))
            return v
        r = rules[i]
        try:
            if gptq is None:
                q = _quantize_one(v, r.fmt, act_fmt=r.act_fmt, compute_dtype=r.compute_dtype,
                                  **r.options())
            elif isinstance(gptq_done[p], Exception):
                raise gptq_done[p]
            else:
                q = gptq_done[p]
        except (ValueError, TypeError, FloatingPointError) as e:
            by = f" (rules[{i}] {r.describe()})" if name_rules else ""
            raise type(e)(f"cannot quantise {p!r} (shape {tuple(v.shape)}, {v.dtype}) to "
                          f"{r.fmt}{by}: {e}") from None
        used[i] = True
        lay = q.layout
        note = ["per tensor" if lay.per_tensor else
                "per channel" if lay.num_blocks == 1 else f"block {lay.block_size}"]
        if r.act_fmt:
            note.append(f"act {r.act_fmt}")
        if r.compute_dtype is not None:
            note.append(f"compute {np.dtype(r.compute_dtype).name}")
        if gptq is not None:
            note.append("gptq")
        rows.append(row(q.fmt, i, size, nbytes(q), ", ".join(note)))
        return q

    out = map_weights(leaf, tree)
    return out, QuantReport(tuple(rows)), used


def _quantize_one(w, fmt, *, axis, act_fmt=None, compute_dtype=None, block_size=None,
                  calibration="absmax", scale_dtype=None, double_quant=False,
                  who: str = "qkern.quantize") -> QArray:
    w = jnp.asarray(w)
    default_axis = axis == -2 and w.ndim == 1
    fmt = get_format(fmt)
    calibration = parse_calibration(calibration)
    layout = make_layout(w.shape, fmt, block_size, axis, default_axis=default_axis)
    nd = len(layout.shape)
    if nd >= 2 and layout.axis == nd - 1 and not layout.per_tensor:
        # An [..., out, in] weight blocked along `in` (Equinox, PyTorch checkpoints): store
        # it with its last two axes swapped, blocked along the second-last, and a pending
        # transpose (perm). The kernels take that storage as it is (stacked layers: each
        # scan step's slice); stored as given, every matmul would transpose the codes.
        q = _quantize_one(jnp.swapaxes(w, -1, -2), fmt, axis=nd - 2, act_fmt=act_fmt,
                          compute_dtype=compute_dtype, block_size=block_size, calibration=calibration,
                          scale_dtype=scale_dtype, double_quant=double_quant, who=who)
        return dataclasses.replace(q, perm=tuple(range(nd - 2)) + (nd - 1, nd - 2))
    fields = _quantize_fields(w, fmt.name, axis=axis, default_axis=default_axis,
                              block_size=block_size, calibration=calibration,
                              scale_dtype=scale_dtype, double_quant=double_quant)
    refuse_nonfinite(fields.pop("nonfinite_blocks"), w, who, fields.pop("overflow_blocks"),
                     scale_dtype)
    return QArray(**fields, fmt=fmt.name, layout=layout, dtype=np.dtype(w.dtype),
                  act_fmt=act_fmt, compute_dtype=as_compute_dtype(compute_dtype))


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "default_axis", "block_size",
                                             "calibration", "scale_dtype", "double_quant"))
def _quantize_fields(w, fmt, *, axis, default_axis, block_size, calibration, scale_dtype,
                     double_quant):
    # One compiled program per (shape, dtype, format, options): quantising a model leaf by
    # leaf eagerly would compile every primitive of the quantiser for every new shape.
    fields = quantize_array(w, fmt, axis=axis, default_axis=default_axis, block_size=block_size,
                            calibration=calibration, scale_dtype=scale_dtype,
                            double_quant=double_quant)
    fields.pop("layout")
    return fields


def dequantize(x: Any) -> Any:
    """The float array a QArray stands for (`qw.materialise()`); on a pytree, every QArray."""
    if isinstance(x, QArray):
        return x.materialise()
    return jax.tree_util.tree_map(lambda v: v.materialise() if isinstance(v, QArray) else v,
                                  x, is_leaf=lambda v: isinstance(v, QArray))
