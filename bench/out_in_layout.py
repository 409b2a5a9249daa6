"""`[out, in]` weights (Equinox, PyTorch checkpoints) against `[in, out]` ones, at M = 1.

    python bench/out_in_layout.py                    # K = N = 4096, int8 and nf4
    python bench/out_in_layout.py --m 16 --formats int4

Rows, all timed in turns against the dense float32 `x @ w` in one process:
  [in, out]                 qkern.quantize(w, fmt), computed as x @ w
  [out, in] axis=-1         qkern.quantize(w.T, fmt, axis=-1), computed as x @ w.T: stored
                            transposed with a pending transpose, the kernels' layout
  [out, in] stored axis 1   the same weight stored blocked along its axis 1 (as qkern
                            stored it before, and as older checkpoints hold it): the dispatch
                            transposes its codes on every call
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

import qkern
from qkern._bench.timing import interleaved_medians


def legacy_layout(q):
    """`q` ([in, out] storage blocked along axis 0) as the [out, in] QArray stored blocked
    along axis 1, with no pending transpose."""
    t = lambda a: None if a is None else a.T
    layout = dataclasses.replace(q.layout, shape=q.layout.shape[::-1], axis=1)
    return dataclasses.replace(q, data=t(q.data), scales=t(q.scales), zeros=t(q.zeros),
                               layout=layout, perm=None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--formats", default="int8,nf4")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    w = jax.random.normal(jax.random.key(0), (a.k, a.n)) / np.sqrt(a.k)    # [in, out]
    x = jax.random.normal(jax.random.key(1), (a.m, a.k))
    dense = jax.jit(lambda x, w: x @ w)
    forward = jax.jit(qkern.quaxify(lambda x, w: x @ w))
    transposed = jax.jit(qkern.quaxify(lambda x, w: x @ w.T))
    timers = {"dense": lambda: dense(x, w)}
    for fmt in a.formats.split(","):
        q_in_out = qkern.quantize(w, fmt)
        q_out_in = qkern.quantize(w.T, fmt, axis=-1)
        q_legacy = legacy_layout(q_in_out)
        want = np.asarray(forward(x, q_in_out))
        for q in (q_out_in, q_legacy):
            np.testing.assert_allclose(transposed(x, q), want, rtol=1e-4, atol=1e-4)
        timers[f"{fmt} [in, out]"] = lambda q=q_in_out: forward(x, q)
        timers[f"{fmt} [out, in] axis=-1"] = lambda q=q_out_in: transposed(x, q)
        timers[f"{fmt} [out, in] stored axis 1"] = lambda q=q_legacy: transposed(x, q)
    t = interleaved_medians(timers, repeats=a.repeats)
    print(f"x[{a.m}, {a.k}] @ W, K={a.k}, N={a.n}, on {jax.devices()[0].device_kind} "
          f"(jax {jax.__version__})")
    print("| weight | time (ms) | speed-up vs dense |")
    print("|---|---|---|")
    for name, v in t.items():
        print(f"| {name} | {v * 1e3:.2f} | {t['dense'] / v:.2f}x |")


if __name__ == "__main__":
    main()
