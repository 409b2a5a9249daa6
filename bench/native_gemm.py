"""Weight-only matmuls at prefill and encoder sizes on the CPU: the shipped path against
the native blocked GEMM forced, the K-chunked scan, dequantise-then-dot, and the dense dots
a user could run instead (XLA float32, XLA bfloat16), `x @ w` under
`jax.jit(qkern.quaxify(...))`.

    python bench/native_gemm.py                              # MiniLM's shapes, M = 64, 1024
    python bench/native_gemm.py --shapes 4096x4096 --m 64,512 --formats nf4,int8

The shipped path with float32 x on AVX-512 (qkern/pallas/qmatmul/_native): from 49 rows the
native GEMM, except for weights of at most 8 MiB in float32 from M = 128, which keep
dequantise-then-dot (`_config.heuristic_config`).
Columns: dense float32 (ms), then speed-ups over it: the shipped path; "GEMM" (the native
kernel called directly); "scan" (chunks of
512 stored rows, `_scan_matmul`, which ran from M = 49 to 127, and for weights above 8 MiB
in float32 at any M); "dequant + dot" (`MatmulConfig(dequantize=True)`, which ran from
M = 128 for smaller weights); dense bfloat16 (XLA's bfloat16 dot, float32 sums, AMX where
the CPU has it: another precision, for reference). Every call is timed in turns in one
process (`interleaved_after`), each right after a dense float32 dot; each result is
checked against the reference first. On a 2-core VM cells move by 10-30 % between runs:
compare columns of one run. The CPU model and its vector flags are printed with it.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from qkern._bench.timing import interleaved_after
from qkern.pallas import MatmulConfig, qmatmul, stored_operand
from qkern.pallas._operand import reference_dequantize
from qkern.pallas.qmatmul import _native
from qkern.pallas.qmatmul._xla import _scan_matmul

sys.path.insert(0, os.path.dirname(__file__))
from peers import cpu  # noqa: E402  (the CPU model and flags line)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="384x1536,1536x384,384x384", help="KxN, comma-separated")
    p.add_argument("--m", default="64,1024", help="rows of x, comma-separated")
    p.add_argument("--formats", default="nf4,int4,int8,fp8_e4m3")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    mm = jax.jit(qkern.quaxify(lambda x, w: x @ w))
    dense = jax.jit(lambda x, w: x @ w)
    dense_bf16 = jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w,
                                              preferred_element_type=jnp.float32))
    scan = jax.jit(lambda x, op: _scan_matmul(x, op, MatmulConfig(block_k=512)))
    deq = jax.jit(lambda x, op: qmatmul(x, op, backend="xla",
                                        config=MatmulConfig(dequantize=True)))
    gemm = jax.jit(lambda x, op: _native._native(x, op))
    print(f"{cpu()}\nbackend {jax.default_backend()}, jax {jax.__version__}, native kernels "
          f"{_native.variant() or 'absent'}; speed-up over dense float32")
    head = (f"{'K x N':>11} {'M':>5} {'format':>9} {'f32 ms':>8} {'shipped':>8} {'GEMM':>7} "
            f"{'scan':>7} {'dequant+dot':>11} {'bf16 dense':>10}")
    print(head)
    print("-" * len(head))
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) / np.sqrt(k)
        wb = w.astype(jnp.bfloat16)
        for m in map(int, a.m.split(",")):
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
            for fmt in a.formats.split(","):
                qw = qkern.quantize(w, fmt)
                op = stored_operand(qw)
                want = jnp.dot(x, reference_dequantize(op), precision="highest")
                scale = float(jnp.max(jnp.abs(want)))
                runs = {"shipped": mm, "scan": scan, "dequant": deq}
                if _native.variant() and _native._kernel_for(op):
                    runs["gemm"] = gemm
                for name, f in runs.items():
                    y = f(x, qw) if name == "shipped" else f(x, op)
                    err = float(jnp.max(jnp.abs(y - want))) / scale
                    if err > 1e-5:
                        raise SystemExit(f"{name}: relative error {err:.2e} at {shape}, "
                                         f"M={m}, {fmt}")
                timed = {"shipped": lambda: mm(x, qw), "scan": lambda: scan(x, op),
                         "dequant": lambda: deq(x, op), "bf16": lambda: dense_bf16(x, wb)}
                if "gemm" in runs:
                    timed["gemm"] = lambda: gemm(x, op)
                # each right after a dense float32 dot
                t, f32 = interleaved_after(timed, lambda: dense(x, w), repeats=a.repeats)
                g = f"{f32 / t['gemm']:6.2f}x" if "gemm" in t else f"{'-':>7}"
                print(f"{shape:>11} {m:>5} {fmt:>9} {f32 * 1e3:8.3f} {f32 / t['shipped']:7.2f}x "
                      f"{g} {f32 / t['scan']:6.2f}x {f32 / t['dequant']:10.2f}x "
                      f"{f32 / t['bf16']:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
