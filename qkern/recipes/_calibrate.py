"""Calibration: run the model on sample batches and record what its matmuls see.

`calibrate`: static activation scales for W8A8 (each quantised layer's activation absmax,
stored as the layer's `act_scale`). `hessians`: GPTQ's statistics (H = X^T X / rows of
each float weight's inputs), for `qkern.quantize(..., gptq=...)`.

    qparams = qkern.quantize(params, rules=[qkern.Rule(r".*kernel", "int8", act_fmt="int8")])
    qparams = qkern.calibrate(model, qparams, batches)     # model(params, batch)
    y = qkern.quaxify(model)(qparams, x)                   # W8A8 with static scales

    hs = qkern.hessians(model, params, batches)            # float params
    qparams = qkern.quantize(params, rules=rules, gptq=hs)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import itertools
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .._core import ArrayLike, ArrayValue, Value, quaxify, register, static_field
from ..types.qarray import QArray
from ._paths import path_str, selector

_sessions = itertools.count()
_recorders: dict[int, "_Recorder"] = {}
_lock = threading.Lock()


class _Recorder:
    def __init__(self):
        self.absmax: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.pending: list = []             # (tag, amax) as the callbacks got them

    def observe(self, tag: str, amax) -> None:
        # Only keep the array: converting it here, inside the callback, can wait on the
        # runtime thread that runs the callback (see _GramRecorder.observe).
        with _lock:
            self.pending.append((tag, amax))

    def collect(self) -> None:
        """Fold the pending observations into the running maxima (on the calling thread)."""
        with _lock:
            pending, self.pending = self.pending, []
        for tag, amax in pending:
            v = float(np.max(np.asarray(amax)))      # under vmap, one value per batch element
            self.absmax[tag] = max(self.absmax.get(tag, 0.0), v)
            self.calls[tag] = self.calls.get(tag, 0) + 1


def _run_recording(name: str, fn: Callable, tree: Any, batches: Iterable[Any], session: int,
                   recorder) -> int:
    """Run the quaxified `fn(tree, batch)` over `batches` with `recorder` registered for
    `session`, folding each batch's observations in as it finishes; returns the number of
    batches (an error when there were none)."""
    run = quaxify(fn)
    _recorders[session] = recorder
    try:
        n = 0
        for batch in batches:
            jax.block_until_ready(run(tree, batch))
            jax.effects_barrier()
            recorder.collect()           # one batch's observations at a time in memory
            n += 1
    finally:
        del _recorders[session]
    if n == 0:
        raise ValueError(f"{name}: `batches` was empty; give at least one sample batch.")
    return n


class _Recording(QArray):
    """A W8A8 QArray under `calibrate`: its matmuls run weight-only and report the
    absmax of the activations they see. `session` keeps jit caches of one calibration
    from being reused by the next."""

    tag: str = static_field(default="")
    session: int = static_field(default=-1)

    def record_activation(self, x: jax.Array) -> None:
        recorder = _recorders[self.session]
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
        jax.debug.callback(functools.partial(recorder.observe, self.tag), amax)


def calibrate(fn: Callable, params: Any, batches: Iterable[Any], *, margin: float = 1.0) -> Any:
    """Set the static activation scale of every W8A8 weight (`act_fmt="int8"`) in `params`.

    fn: the model, called as `fn(params, batch)` for each batch (qkern quaxifies it; it
    may use jit, scan, vmap inside). Every matmul `x @ W` against such a weight records
    max |x| over all batches (activations in float, weights quantised); the weight's
    `act_scale` becomes `margin * absmax / 127`, so serving quantises x as
    `clip(round(x / act_scale), -127, 127)` with one scale per tensor, computed once.
    A stacked weight ([layers, K, N], run under `lax.scan`) gets one scale for all its
    layers (the largest), stored once per layer so scan can slice it.

    Returns `params` with those scales set (a new tree; QArrays otherwise unchanged).
    Weights that no batch reached keep dynamic per-row scales, with a warning.
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"calibrate: margin must be a finite positive number, got {margin!r}.")
    session = next(_sessions)
    recorder = _Recorder()
    targets = {}

    def wrap(path, v):
        if isinstance(v, QArray) and v.act_fmt is not None:
            tag = path_str(path)
            targets[tag] = v
            fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(QArray)}
            return _Recording(**fields, tag=tag, session=session)
        return v

    is_q = lambda v: isinstance(v, QArray)
    recording = jax.tree_util.tree_map_with_path(wrap, params, is_leaf=is_q)
    if not targets:
        raise ValueError(
            "calibrate: no quantised weight in params quantises its activations; quantise with "
            "qkern.Rule(..., fmt='int8', act_fmt='int8') first.")
    n = _run_recording("calibrate", fn, recording, batches, session, recorder)

    missed = sorted(set(targets) - set(recorder.absmax))
    if missed:
        warnings.warn(
            f"calibrate: no x @ W matmul reached {', '.join(missed)} in {n} batch(es); they keep "
            "dynamic per-row activation scales.", stacklevel=2)

    def fill(path, v):
        if not isinstance(v, QArray) or v.act_fmt is None:
            return v
        amax = recorder.absmax.get(path_str(path))
        if amax is None:
            return v
        scale = margin * amax / 127.0 if amax > 0 else 1.0
        # One scale per weight; a stacked weight ([layers, K, N], scanned over) carries it
        # on each slice, so `lax.scan` can hand every step its own QArray.
        return dataclasses.replace(
            v, act_scale=jnp.full(tuple(v.shape[:-2]), scale, jnp.float32))

    return jax.tree_util.tree_map_with_path(fill, params, is_leaf=is_q)


# -- Hessians for GPTQ ---------------------------------------------------------------------
class Hessians(Mapping):
    """What `qkern.hessians` recorded: for each weight, H = X^T X / rows over the rows of
    the inputs X that met it in an `x @ W` (the contracted axis of W indexes H).

    A read-only mapping from key path ("layers/0/attn/query/kernel") to a float32 numpy
    `[K, K]` array; `rows[path]` is how many input rows it averages, `axis[path]` the axis of
    the weight that the matmuls contracted (the axis GPTQ blocks along). Pass it to
    `qkern.quantize(..., gptq=hessians)`.
    """

    def __init__(self, h: dict, rows: dict, axis: dict, order: tuple = ()):
        self._h, self.rows, self.axis, self.order = dict(h), dict(rows), dict(axis), tuple(order)

    def __getitem__(self, path: str) -> np.ndarray:
        return self._h[path]

    def __iter__(self):
        return iter(self._h)

    def __len__(self) -> int:
        return len(self._h)

    def __repr__(self) -> str:
        rows = sorted(set(self.rows.values()))
        span = f"{rows[0]}" if len(rows) == 1 else f"{rows[0]}-{rows[-1]}" if rows else "0"
        return f"Hessians({len(self)} weights, {span} rows each)"


class _GramRecorder:
    def __init__(self):
        self.gram: dict[str, np.ndarray] = {}
        self.rows: dict[str, float] = {}
        self.axis: dict[str, set] = {}
        self.order: list[str] = []          # first use at trace time: the model's order
        self.pending: list = []             # (tag, gram, rows) as the callbacks got them

    def traced(self, tag: str, axis: int) -> None:
        with _lock:
            self.axis.setdefault(tag, set()).add(axis)
            if tag not in self.order:
                self.order.append(tag)

    def observe(self, tag: str, gram, rows) -> None:
        # Only keep the arrays: copying them to numpy here, inside the callback, can wait
        # on the runtime thread that runs it (a deadlock seen with one CPU core).
        with _lock:
            self.pending.append((tag, gram, rows))

    def collect(self) -> None:
        """Fold the pending observations into float64 sums (on the calling thread)."""
        with _lock:
            pending, self.pending = self.pending, []
        for tag, gram, rows in pending:
            gram = np.asarray(gram, np.float64)
            gram = gram.reshape((-1,) + gram.shape[-2:]).sum(axis=0)   # vmap: one per element
            rows = float(np.sum(np.asarray(rows)))
            if tag in self.gram:
                self.gram[tag] += gram
                self.rows[tag] += rows
            else:
                self.gram[tag], self.rows[tag] = gram, rows


class _Probe(ArrayValue):
    """A dense weight under `hessians`: its matmuls run as usual and report X^T X of the
    activations they see."""

    w: jax.Array
    tag: str = static_field(default="")
    session: int = static_field(default=-1)
    transposed: bool = static_field(default=False)     # w is the weight's transpose (W.T)

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self):
        return self.w


def _probe_matmul(lhs, rhs, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    right = isinstance(rhs, _Probe)
    w, x = (rhs, lhs) if right else (lhs, rhs)
    w_axes, x_axes = (rc, lc) if right else (lc, rc)
    if (not lb and len(w_axes) == 1 and w.w.ndim == 2
            and jnp.issubdtype(jnp.result_type(x), jnp.floating)):
        recorder = _recorders[w.session]
        axis = int(w_axes[0])
        recorder.traced(w.tag, 1 - axis if w.transposed else axis)
        xm = jnp.moveaxis(jnp.asarray(x), x_axes[0], -1)
        xm = xm.reshape(-1, xm.shape[-1]).astype(jnp.float32)
        gram = jnp.dot(xm.T, xm, precision=jax.lax.Precision.HIGHEST)
        rows = jnp.sum(jnp.ones_like(xm[:, 0]))     # batched with x under vmap
        jax.debug.callback(functools.partial(recorder.observe, w.tag), gram, rows)
    plain = lambda v: v.w if isinstance(v, _Probe) else v
    return jax.lax.dot_general_p.bind(plain(lhs), plain(rhs), **params)


@register(jax.lax.transpose_p)
def _(w: _Probe, *, permutation):
    # W.T stays a probe (x @ W.T records W's axis 1), as a QArray's transpose stays quantised
    return dataclasses.replace(w, w=jax.lax.transpose(w.w, permutation),
                               transposed=w.transposed != (tuple(permutation) == (1, 0)))


@register(jax.lax.convert_element_type_p)
def _(w: _Probe, **params):
    return dataclasses.replace(w, w=jax.lax.convert_element_type_p.bind(w.w, **params))


@register(jax.lax.dot_general_p)
def _(x: ArrayLike, w: _Probe, **params):
    return _probe_matmul(x, w, params)


@register(jax.lax.dot_general_p)
def _(w: _Probe, x: ArrayLike, **params):
    return _probe_matmul(w, x, params)


def _probe_tree(params, where, session):
    select = selector(where)
    tags = []

    def wrap(path, v):
        if (isinstance(v, (jax.Array, np.ndarray)) and not isinstance(v, Value) and v.ndim == 2
                and jnp.issubdtype(v.dtype, jnp.floating)):
            tag = path_str(path)
            if select(tag, v):
                tags.append(tag)
                return _Probe(jnp.asarray(v), tag=tag, session=session)
        return v

    tree = jax.tree_util.tree_map_with_path(wrap, params, is_leaf=lambda v: isinstance(v, Value))
    return tree, tags


def hessians(fn: Callable, params: Any, batches: Iterable[Any], *,
             where: str | Callable | None = None) -> Hessians:
    """Record, for GPTQ, the inputs of every `x @ W` in `fn(params, batch)` over `batches`.

        hs = qkern.hessians(model, params, batches, where=r".*kernel")
        qparams = qkern.quantize(params, rules=rules, gptq=hs)

    fn: the model, called as `fn(params, batch)` for each batch (qkern quaxifies it; it may
    use jit, scan, vmap inside). params: the float model. where: which 2-D floating leaves
    to record (a regex matched in full against the key path, or a predicate `(path, leaf)
    -> bool`; default every 2-D floating leaf). For each selected weight W, every matmul
    that contracts one axis of W with the activations x (`x @ W`, `x @ W.T`, einsum)
    adds x^T x over all rows of x (leading axes flattened) to H; the result is divided
    by the number of rows. Every row counts, padding tokens included: batch sentences of
    similar length (or unpadded) to keep padding out of H.

    Returns a `qkern.Hessians` (path -> float32 numpy [K, K]). Selected weights that no
    matmul reached are absent, with a warning when `where` was given.
    """
    session = next(_sessions)
    recorder = _GramRecorder()
    probed, tags = _probe_tree(params, where, session)
    if not tags:
        raise ValueError(
            f"hessians: where={where!r} selects no 2-D floating leaf of params (GPTQ records the "
            "inputs of float weights; pass the model's float parameters, not quantised ones).")
    n = _run_recording("hessians", fn, probed, batches, session, recorder)
    missed = [t for t in tags if t not in recorder.gram]
    if missed and where is not None:
        warnings.warn(f"hessians: no x @ W matmul reached {', '.join(missed)} in {n} batch(es); "
                      "they have no Hessian.", stacklevel=2)
    h, axis = {}, {}
    for tag, gram in recorder.gram.items():
        axes = recorder.axis[tag]
        if len(axes) > 1:
            raise ValueError(f"hessians: {tag!r} was contracted along axes {sorted(axes)} in "
                             "different matmuls; GPTQ needs one contracted axis per weight.")
        axis[tag] = axes.pop()
        h[tag] = (gram / max(recorder.rows[tag], 1.0)).astype(np.float32)
    return Hessians(h, {t: int(r) for t, r in recorder.rows.items()}, axis,
                    tuple(t for t in recorder.order if t in h))
