"""Weight-only x @ W above the decode kernels (M > 16) on the `xla` backend: the K-chunked
scan against dequantise-then-dot (`MatmulConfig(dequantize=True)`), both against the dense
float32 dot, for small (cache-sized) and large weights. It is the measurement behind
`qkern.pallas._config.heuristic_config` (SMALL_WEIGHT_BYTES).

    python bench/dequantize_crossover.py
    python bench/dequantize_crossover.py --shapes 384x1536,4096x4096 --m 32,128 --formats nf4

All calls of one (shape, M) are timed in turns in one process (`interleaved_medians`); each
cell is a speed-up over the dense dot at that shape and M. The CPU model and flags are
printed first: the crossover depends on the cache sizes.
"""

from __future__ import annotations

import argparse
import subprocess

import jax

import qkern
from qkern._bench.timing import interleaved_medians
from qkern.pallas import MatmulConfig, qmatmul, stored_operand
from qkern.pallas._config import default_config


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    keep = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                        "avx512_bf16", "amx_int8", "amx_bf16") if f in flags]
    return f"{info.get('Model name', '?').strip()}; flags: {' '.join(keep)}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="384x384,384x1536,1536x384,4096x4096",
                   help="KxN weights, comma-separated")
    p.add_argument("--m", default="32,128,512")
    p.add_argument("--formats", default="int8,int4,nf4,fp8_e4m3")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    print(f"{cpu()}; jax {jax.__version__}")
    print("| K x N | M | dense ms | " + " | ".join(
        f"{f} scan | {f} dequantised" for f in a.formats.split(",")) + " |")
    print("|" + "---|" * (3 + 2 * len(a.formats.split(","))))
    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = jax.random.normal(jax.random.PRNGKey(1), (k, n))
        ops = {f: stored_operand(qkern.quantize(w, f)) for f in a.formats.split(",")}
        dense = jax.jit(lambda x, w: x @ w)
        for m in (int(v) for v in a.m.split(",")):
            x = jax.random.normal(jax.random.PRNGKey(0), (m, k))
            scan = jax.jit(lambda x, op, m=m: qmatmul(x, op, backend="xla",
                                                      config=default_config("xla", m)))
            deq = jax.jit(lambda x, op: qmatmul(x, op, backend="xla",
                                                config=MatmulConfig(dequantize=True)))
            fns = {"dense": lambda: dense(x, w)}
            for f, op in ops.items():
                fns[f"{f} scan"] = lambda op=op: scan(x, op)
                fns[f"{f} deq"] = lambda op=op: deq(x, op)
            t = interleaved_medians(fns, repeats=a.repeats)
            cells = " | ".join(f"{t['dense'] / t[f'{f} scan']:.2f}x | "
                               f"{t['dense'] / t[f'{f} deq']:.2f}x" for f in ops)
            print(f"| {k} x {n} | {m} | {t['dense'] * 1e3:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
