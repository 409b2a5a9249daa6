"""Timing helpers: warm-up, device synchronisation, median of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def median_time(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 2,
                min_seconds: float = 0.0) -> float:
    """Median wall time of `fn()` in seconds, blocking on its outputs each call."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleaved_medians(fns: dict, *, repeats: int = 20, warmup: int = 2) -> dict:
    """Median wall time in seconds of each of `fns` ({name: fn}), timed in turns
    (a, b, a, b, ...) so that load from other processes, which comes and goes, falls on
    every one alike: the ratios stay meaningful on a busy machine."""
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_after(fns: dict, before, *, repeats: int = 20, warmup: int = 2):
    """`interleaved_medians` of `fns` with `before()` run and timed right before each of
    them, as a model calls them after other work (the first int8 dot after a float32 one
    ran up to 1.7x slower than the same dot called again). Returns (medians of `fns`,
    the median of `before`'s medians)."""
    turns = {}
    for name, fn in fns.items():
        turns[("before", name)] = before
        turns[name] = fn
    t = interleaved_medians(turns, repeats=repeats, warmup=warmup)
    return ({name: t[name] for name in fns},
            statistics.median(t[("before", name)] for name in fns))
