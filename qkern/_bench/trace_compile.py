"""Cost of the dispatch trace: a deep MLP whose weights are a user-defined Value type.

The weight type is a low-rank update `W + A @ B` written with the public extension API
(the shape of a LoRA weight). Compared in the same run against the same MLP on the dense
materialised weights: trace+compile time (layers unrolled in Python, and stacked under
`lax.scan`) and run time at batch 1 and 64. Ratios are quaxified / dense.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

import qkern
from .progress import bar
from .timing import median_time


class LowRankUpdate(qkern.ArrayValue):
    """`w + a @ b` kept factored: the benchmark's user-defined weight type."""

    w: jax.Array
    a: jax.Array
    b: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self):
        return self.w + self.a @ self.b


@qkern.register(jax.lax.dot_general_p)
def _lowrank_matmul(x: qkern.ArrayLike, w: LowRankUpdate, *, dimension_numbers, precision,
                    preferred_element_type, **params):
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(rc) != (w.ndim - 2,) or tuple(lc) != (x.ndim - 1,):
        return jax.lax.dot_general(x, w.materialise(), dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    # Contract in the layout the operands already have: no transposes of w, a or b.
    return x @ w.w + (x @ w.a) @ w.b


def _mlp_unrolled(weights, x):
    for w in weights:
        x = jnp.tanh(x @ w)
    return x


def _mlp_scanned(stacked, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None
    return jax.lax.scan(layer, x, stacked)[0]


def make_weights(layers: int, width: int, rank: int, key=None):
    key = jax.random.PRNGKey(0) if key is None else key
    kw, ka, kb = jax.random.split(key, 3)
    w = jax.random.normal(kw, (layers, width, width)) / width**0.5
    a = jax.random.normal(ka, (layers, width, rank)) / width**0.5
    b = jax.random.normal(kb, (layers, rank, width)) * 0.01
    return w, a, b


def _compile_seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0


def run(layers: int = 24, width: int = 512, rank: int = 8, batches=(1, 64),
        repeats: int = 3, progress: bool | None = None) -> list[dict[str, Any]]:
    """Rows of {measurement, dense_s, qkern_s, ratio}; ratio = qkern / dense (lower is better).
    progress: a bar on stderr, one step per row (None: when stderr is a terminal)."""
    with bar(2 + len(batches), "qkern bench trace", enabled=progress) as pbar:
        return _run(pbar, layers, width, rank, batches, repeats)


def _run(pbar, layers, width, rank, batches, repeats) -> list[dict[str, Any]]:
    w, a, b = make_weights(layers, width, rank)
    stacked = LowRankUpdate(w, a, b)
    per_layer = [LowRankUpdate(w[i], a[i], b[i]) for i in range(layers)]
    dense_stacked = stacked.materialise()
    dense_layers = [p.materialise() for p in per_layer]
    x1 = jnp.ones((1, width))

    q_unrolled = qkern.quaxify(_mlp_unrolled)
    q_scanned = qkern.quaxify(_mlp_scanned)
    rows = []

    def best_of(fn, *args):
        # Fresh closures each time so jit's caches do not hide the trace.
        return min(_compile_seconds(lambda *a: fn(*a), *args) for _ in range(repeats))

    for name, qf, qargs, df, dargs in [
        ("trace+compile, unrolled", q_unrolled, (per_layer, x1), _mlp_unrolled, (dense_layers, x1)),
        ("trace+compile, scanned", q_scanned, (stacked, x1), _mlp_scanned, (dense_stacked, x1)),
    ]:
        pbar.set_postfix_str(name)
        dense_s = best_of(df, *dargs)
        qkern_s = best_of(qf, *qargs)
        rows.append(dict(measurement=name, dense_s=dense_s, qkern_s=qkern_s,
                         ratio=qkern_s / dense_s))
        pbar.update()

    run_q = jax.jit(q_unrolled)
    run_d = jax.jit(_mlp_unrolled)
    for batch in batches:
        pbar.set_postfix_str(f"run time, batch {batch}")
        x = jnp.ones((batch, width))
        dense_s = median_time(lambda: run_d(dense_layers, x), repeats=30)
        qkern_s = median_time(lambda: run_q(per_layer, x), repeats=30)
        rows.append(dict(measurement=f"run time, batch {batch}", dense_s=dense_s,
                         qkern_s=qkern_s, ratio=qkern_s / dense_s))
        pbar.update()
    return rows


def format_table(rows) -> str:
    lines = ["| measurement | dense (ms) | qkern (ms) | qkern / dense |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['measurement']} | {r['dense_s'] * 1e3:.2f} | "
                     f"{r['qkern_s'] * 1e3:.2f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)
