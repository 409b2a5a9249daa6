"""W8A8 (`act_fmt="int8"`) on the CPU: the shipped path against fixed K chunks, weight-only
int8 and the dense float32 dot, `x @ w` under `jax.jit(qkern.quaxify(...))`.

    python bench/w8a8_cpu.py                                # MiniLM's shapes, M = 1, 32, 1024
    python bench/w8a8_cpu.py --shapes 4096x4096 --m 1,4,8,32,256

The shipped path (`qkern/pallas/w8a8/_xla.py`): below 8 rows the native int8 kernel on the
codes of x where it runs; from 8 rows one int8 dot over the whole of K
(`_config.heuristic_config`). The "chunks of B" and "one dot" columns force a scan over K chunks of B rows, or none (`MatmulConfig(block_k=B)`; 256
was the shipped choice below M = 17, 512 above, before 2026-12-04); below 8 rows, where the
native kernel runs, they run it too. Every call is timed in turns in one process
(`interleaved_after`), each right after a dense float32 dot, as in a model: the first
int8 dot after a float32 one ran up to 1.7x slower here (a 2-core Xeon with AMX) than the
same dot called again. Cells are speed-ups over dense float32 at that shape and M; on a
2-core VM they move by 10-30 % between runs, so compare columns of one run. Each W8A8
result is checked against the reference first.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from qkern._bench.timing import interleaved_after
from qkern.pallas import MatmulConfig, stored_operand
from qkern.pallas.w8a8 import w8a8_matmul
from qkern.pallas.w8a8.base import w8a8_reference

CHUNKS = (256, 512, 1 << 30)      # the last: one dot over the whole of K


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="384x1536,1536x384,384x384", help="KxN, comma-separated")
    p.add_argument("--m", default="1,32,1024")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    # one jitted function per weight kind: a jitted function called with pytrees of two
    # structures in turns ran measurably slower per call than two functions
    mm = jax.jit(qkern.quaxify(lambda x, w: x @ w))
    mm_wo = jax.jit(qkern.quaxify(lambda x, w: x @ w))
    dense = jax.jit(lambda x, w: x @ w)
    chunked = {b: jax.jit(lambda x, op, b=b: w8a8_matmul(x, op, config=MatmulConfig(block_k=b)))
               for b in CHUNKS}
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; speed-up over dense float32")
    label = lambda b: "one dot" if b == CHUNKS[-1] else f"chunks of {b}"
    head = (f"{'K x N':>11} {'M':>5} {'f32 ms':>8} {'W8A8':>7}"
            + "".join(f" {label(b):>14}" for b in CHUNKS) + f" {'int8 (w-only)':>14}")
    print(head)
    print("-" * len(head))
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) / np.sqrt(k)
        q8 = qkern.quantize(w, "int8")
        qa = qkern.quantize(w, "int8", act_fmt="int8")
        op = stored_operand(q8)
        for m in map(int, a.m.split(",")):
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
            want = w8a8_reference(x, op)
            scale = float(jnp.max(jnp.abs(want)))
            for name, y in [("W8A8", mm(x, qa))] + [(label(b), f(x, op))
                                                     for b, f in chunked.items()]:
                err = float(jnp.max(jnp.abs(y - want))) / scale
                if err > 1e-5:
                    raise SystemExit(f"{name}: relative error {err:.2e} at {shape}, M={m}")
            timed = {"w-only": lambda: mm_wo(x, q8)}
            for b, f in chunked.items():
                timed[b] = lambda f=f: f(x, op)
            timed["w8a8"] = lambda: mm(x, qa)
            # each right after a dense float32 dot
            t, f32 = interleaved_after(timed, lambda: dense(x, w), repeats=a.repeats)
            row = (f"{shape:>11} {m:>5} {f32 * 1e3:8.3f} {f32 / t['w8a8']:6.2f}x"
                   + "".join(f" {f32 / t[b]:13.2f}x" for b in CHUNKS)
                   + f" {f32 / t['w-only']:13.2f}x")
            print(row, flush=True)


if __name__ == "__main__":
    main()
