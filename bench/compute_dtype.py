"""`compute_dtype="bfloat16"` against float32 compute, and both against the dense dot in
float32 and bfloat16: `x @ w` under `jax.jit(qkern.quaxify(...))`.

    python bench/compute_dtype.py                                  # MiniLM's shapes, M = 1024
    python bench/compute_dtype.py --shapes 4096x4096 --m 16,512 --formats nf4

Every call is timed in turns in one process (`interleaved_medians`); cells are speed-ups
over dense float32 x @ w at that shape and M. Each quantised result is checked against
x @ dequantize(q) first (within bfloat16's rounding). Where XLA's bfloat16 dot is fast (a
CPU with AMX or AVX512-BF16) the bfloat16 rows win at large M; elsewhere they may lose.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from qkern._bench.timing import interleaved_medians


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="384x1536,1536x384,384x384", help="KxN, comma-separated")
    p.add_argument("--m", default="1024")
    p.add_argument("--formats", default="nf4,int8")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    mm = jax.jit(qkern.quaxify(lambda x, w: x @ w))
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    fmts = a.formats.split(",")
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; speed-up over dense float32")
    head = f"{'K x N':>11} {'M':>5} {'f32 ms':>8} {'dense bf16':>10}" + "".join(
        f" {f + ' f32':>10} {f + ' bf16':>10}" for f in fmts)
    print(head)
    print("-" * len(head))
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) / np.sqrt(k)
        wb = w.astype(jnp.bfloat16)
        qs = {(f, c): qkern.quantize(w, f, compute_dtype=c) for f in fmts
              for c in (None, "bfloat16")}
        for m in map(int, a.m.split(",")):
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
            xb = x.astype(jnp.bfloat16)
            for (f, c), q in qs.items():
                exact = x @ qkern.dequantize(q)
                err = float(jnp.max(jnp.abs(mm(x, q) - exact)) / jnp.max(jnp.abs(exact)))
                if err > (2e-2 if c else 1e-4):
                    raise SystemExit(f"{f} compute {c}: relative error {err:.2e} at M={m}")
            fns = {"f32": lambda: dense(x, w), "bf16": lambda: dense(xb, wb)}
            for (f, c), q in qs.items():
                fns[(f, c)] = lambda q=q: mm(x, q)
            t = interleaved_medians(fns, repeats=a.repeats)
            row = f"{shape:>11} {m:>5} {t['f32'] * 1e3:8.2f} {t['f32'] / t['bf16']:9.2f}x"
            for f in fmts:
                row += "".join(f" {t['f32'] / t[(f, c)]:9.2f}x" for c in (None, "bfloat16"))
            print(row, flush=True)


if __name__ == "__main__":
    main()
