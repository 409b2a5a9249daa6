"""Static activation scales for W8A8: run the model on sample batches, record each
quantised layer's activation absmax, store it as the layer's `act_scale`.

    qparams = qkern.quantize(params, rules=[qkern.Rule(r".*kernel", "int8", act_fmt="int8")])
    qparams = qkern.calibrate(model, qparams, batches)     # model(params, batch)
    y = qkern.quaxify(model)(qparams, x)                   # W8A8 with static scales
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ._core import quaxify, static_field
from ._paths import path_str
from .types.qarray import QArray

_sessions = itertools.count()
_recorders: dict[int, "_Recorder"] = {}
_lock = threading.Lock()


class _Recorder:
    def __init__(self):
        self.absmax: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def observe(self, tag: str, amax) -> None:
        v = float(np.max(np.asarray(amax)))      # under vmap, one value per batch element
        with _lock:
            self.absmax[tag] = max(self.absmax.get(tag, 0.0), v)
            self.calls[tag] = self.calls.get(tag, 0) + 1


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
    if margin <= 0:
        raise ValueError(f"calibrate: margin must be positive, got {margin}.")
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
    run = quaxify(fn)
    _recorders[session] = recorder
    try:
        n = 0
        for batch in batches:
            jax.block_until_ready(run(recording, batch))
            n += 1
        jax.effects_barrier()
    finally:
        del _recorders[session]
    if n == 0:
        raise ValueError("calibrate: `batches` was empty; give at least one sample batch.")

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
