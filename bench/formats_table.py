"""Accuracy and size of every format on N(0, 1) weights: the table in docs/formats.md.

    python bench/formats_table.py            # K = N = 4096 (the docs' numbers)
    python bench/formats_table.py --size 1024

Per format with its default blocks: bits per parameter (codes + scales + zero points +
double-quantisation data, as stored), relative mean absolute error of the dequantised
weight, and relative error of x @ W for x ~ N(0, 1) with 16 rows:
||x @ W - x @ Q(W)||_F / ||x @ W||_F.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import qkern
from qkern.formats import FORMATS

CASES = [(f, {}) for f in FORMATS] + [
    ("int4", dict(calibration="minmax")),
    ("int8", dict(block_size=128)),
    ("nf4", dict(double_quant=True)),
    ("fp8_e4m3", dict(block_size=128)),
]


def measure(size: int, seed: int = 0):
    kw, kx = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(kw, (size, size), jnp.float32)
    x = jax.random.normal(kx, (16, size), jnp.float32)
    ref = x @ w
    rows = []
    for fmt, opts in CASES:
        q = qkern.quantize(w, fmt, **opts)
        d = q.materialise()
        rel_mae = float(jnp.mean(jnp.abs(d - w)) / jnp.mean(jnp.abs(w)))
        rel_mm = float(jnp.linalg.norm(x @ d - ref) / jnp.linalg.norm(ref))
        label = fmt + "".join(f", {k}={v}" for k, v in opts.items())
        blocks = "per channel" if q.block_size >= size else f"{q.block_size}"
        rows.append(dict(format=label, blocks=blocks, bits=q.bits_per_parameter(),
                         rel_mae=rel_mae, rel_matmul=rel_mm))
    return rows


def table(rows) -> str:
    out = ["| format | block | bits / parameter | rel. mean abs. error | rel. matmul error |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['format']} | {r['blocks']} | {r['bits']:.3f} | {r['rel_mae']:.4f} | "
                   f"{r['rel_matmul']:.4f} |")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    print(table(measure(args.size)))
