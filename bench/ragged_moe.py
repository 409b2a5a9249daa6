"""Mixture-of-experts matmul on a CPU: `jax.lax.ragged_dot(x, W, group_sizes)` with the
stacked experts W [E, K, N] quantised (`qkern.quantize(w, fmt, axis=-2)`, run through
`qkern.quaxify`) against the same call on dense float32 experts, in one process, in turns.

    python bench/ragged_moe.py                                  # decode 1 and 16 tokens, prefill
    python bench/ragged_moe.py --tokens 1,16 --k 2048 --n 2048 --formats int8,nf4
    python bench/ragged_moe.py --tokens 16 --tm 1,2,4,8,16      # the window (block_m) sweep

Rows: tokens * top_k rows of x, routed by random router logits to their top_k experts and
sorted by expert (as a MoE layer does before its expert matmuls). Each cell is the median
time; the ratio is dense time / quantised time (above 1: the quantised call is faster).
Results are checked against the dense ragged_dot on the dequantised experts first.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from qkern._bench.timing import interleaved_medians
from qkern.pallas import MatmulConfig
from qkern.pallas.ragged_qmatmul import ragged_qmatmul
from qkern.pallas.ragged_qmatmul._xla import default_tm
from qkern.types._qarray_ragged import stacked_operand


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def routed(tokens: int, experts: int, top_k: int, k: int, seed: int = 0):
    """(x [tokens * top_k, K] sorted by expert, group_sizes [E] int32)."""
    kx, kr = jax.random.split(jax.random.PRNGKey(seed))
    h = jax.random.normal(kx, (tokens, k))
    logits = jax.random.normal(kr, (tokens, experts))
    _, chosen = jax.lax.top_k(logits, top_k)                 # [tokens, top_k]
    flat = chosen.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    x = jnp.repeat(h, top_k, axis=0)[order]
    sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
    return x, sizes


def dense_windows(x, w, group_sizes, tm: int):
    """The xla backend's schedule (windows of tm rows from each group's start) on dense
    float32 experts: a fairer dense baseline than lax.ragged_dot, which on XLA:CPU
    multiplies every row by every expert."""
    m = x.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    windows = (ends - starts + tm - 1) // tm
    last = jnp.cumsum(windows)
    xp = jnp.pad(x, ((0, tm), (0, 0)))

    def body(c):
        j, out = c
        e = jnp.searchsorted(last, j, side="right")
        row = starts[e] + (j - (last[e] - windows[e])) * tm
        yt = jax.lax.dynamic_slice_in_dim(xp, row, tm) @ w[e]
        mine = (row + jnp.arange(tm)) < ends[e]
        cur = jax.lax.dynamic_slice_in_dim(out, row, tm)
        return j + 1, jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine[:, None], yt, cur), row, 0)

    out0 = jnp.zeros((m + tm, w.shape[2]), x.dtype)
    return jax.lax.while_loop(lambda c: c[0] < last[-1], body, (0, out0))[1][:m]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1,16,1024", help="tokens per call (rows = tokens * top_k)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--formats", default="int8,int4,nf4")
    p.add_argument("--tm", default="", help="also time ragged_qmatmul with these windows")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    fmts = a.formats.split(",")
    tms = [int(v) for v in a.tm.split(",") if v]
    w = jax.random.normal(jax.random.PRNGKey(1), (a.experts, a.k, a.n)) * 0.02
    qs = {f: qkern.quantize(w, f, axis=-2) for f in fmts}
    dense = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
    dense_w = jax.jit(dense_windows, static_argnums=3)
    quant = jax.jit(qkern.quaxify(lambda q, x, g: jax.lax.ragged_dot(x, q, g)))
    direct = jax.jit(lambda x, op, g, tm: ragged_qmatmul(x, op, g, config=MatmulConfig(block_m=tm)),
                     static_argnums=3)
    print(f"ragged_dot, E={a.experts} experts [K={a.k}, N={a.n}], top-{a.top_k}; "
          f"CPU: {cpu_model()} ({jax.device_count()} device, jax {jax.__version__}); "
          f"ratio = dense float32 ragged_dot time / quantised time; 'dense windows': the same "
          f"schedule as qkern's on float32 experts")
    head = "| tokens | M | window | dense f32 ragged_dot (ms) | dense windows (ms) | " + " | ".join(
        f"{f} (ms) | {f} ratio" for f in fmts) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for tokens in (int(v) for v in a.tokens.split(",")):
        x, g = routed(tokens, a.experts, a.top_k, a.k)
        m = x.shape[0]
        tm0 = default_tm(m, a.experts)
        timers = {"dense": lambda: dense(x, w, g), "windows": lambda: dense_w(x, w, g, tm0)}
        for f, q in qs.items():
            want = np.asarray(jax.lax.ragged_dot(x, qkern.dequantize(q), g,
                                                 precision=jax.lax.Precision.HIGHEST))
            got = np.asarray(quant(q, x, g))
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
            if err > 1e-4:
                raise AssertionError(f"{f} tokens={tokens}: quantised ragged_dot is off by {err:.1e}")
            timers[f] = lambda q=q: quant(q, x, g)
            op = stacked_operand(q)
            for tm in tms:
                timers[(f, tm)] = lambda op=op, tm=tm: direct(x, op, g, tm)
        t = interleaved_medians(timers, repeats=a.repeats)
        cells = lambda key: f"{t[key] * 1e3:.2f} | {t['dense'] / t[key]:.2f}"
        print(f"| {tokens} | {m} | {tm0} | {t['dense'] * 1e3:.2f} | {t['windows'] * 1e3:.2f} | "
              + " | ".join(cells(f) for f in fmts) + " |")
        for tm in tms:
            print(f"| {tokens} | {m} | {tm} | {t['dense'] * 1e3:.2f} | - | "
                  + " | ".join(cells((f, tm)) for f in fmts) + " |")
    print(f"group sizes of the last row: {np.asarray(g).tolist()}")


if __name__ == "__main__":
    main()
