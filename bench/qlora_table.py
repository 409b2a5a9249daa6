"""QLoRA forward: the fused kernel against the base kernel plus two separate small matmuls,
and both against the dense matmul, all measured in the same run.

    python bench/qlora_table.py                      # K = N = 4096, rank 16, nf4, M = 1, 16, 256
    python bench/qlora_table.py --fmt int4 --rank 64 --m 1,64

Rows (median of repeats timed in turns, after warm-up, synchronised):
  dense      x @ W in the dense dtype (bfloat16 on GPU/TPU, float32 on CPU)
  base       the quantised kernel alone, x @ Wq
  separate   x @ Wq + s * (x @ a) @ b as three calls (the unfused way)
  fused      lora_qmatmul: one kernel for both products (on the CPU `xla` path this is the
             quantised matmul plus two small dots inside one jit)
The ratio columns divide the dense time by each (above 1: faster than dense) and the
separate time by the fused time (above 1: fusing pays).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import qkern
from qkern._bench.timing import interleaved_medians
from qkern.pallas import qmatmul, stored_operand
from qkern.pallas.lora_qmatmul.api import lora_qmatmul


def measure(fmt: str, m: int, k: int, n: int, rank: int, repeats: int) -> dict:
    dense_dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    kw, kx, ka, kb = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(kw, (k, n), dense_dtype)
    x = jax.random.normal(kx, (m, k), dense_dtype)
    a = jax.random.normal(ka, (k, rank), jnp.float32) / k ** 0.5
    b = jax.random.normal(kb, (rank, n), jnp.float32) / rank ** 0.5
    op = stored_operand(qkern.quantize(w, fmt))
    s = 2.0

    dense = jax.jit(lambda x, w: x @ w)
    base = jax.jit(lambda x, op: qmatmul(x, op))
    down = jax.jit(lambda x, a: jnp.dot(x, a.astype(x.dtype)))
    up = jax.jit(lambda y, t, b: y + s * jnp.dot(t, b.astype(t.dtype)))
    fused = jax.jit(lambda x, op, a, b: lora_qmatmul(x, op, a, b, s))

    def separate():
        return up(base(x, op), down(x, a), b)

    t = interleaved_medians({            # in turns, so load from elsewhere hits all alike
        "dense": lambda: dense(x, w),
        "base": lambda: base(x, op),
        "separate": separate,
        "fused": lambda: fused(x, op, a, b),
    }, repeats=repeats)
    ref = x.astype(jnp.float32) @ qkern.dequantize(qkern.quantize(w, fmt)).astype(jnp.float32) \
        + s * (x.astype(jnp.float32) @ a) @ b
    got = fused(x, op, a, b).astype(jnp.float32)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    return dict(fmt=fmt, m=m, k=k, n=n, rank=rank, **{f"{k_}_ms": v * 1e3 for k_, v in t.items()},
                fused_vs_separate=t["separate"] / t["fused"],
                fused_vs_dense=t["dense"] / t["fused"], base_vs_dense=t["dense"] / t["base"],
                rel_err=err)


def format_table(rows: list[dict]) -> str:
    head = ("| M | dense ms | base ms | separate ms | fused ms | fused vs separate "
            "| fused vs dense | base vs dense | rel. error |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['m']} | {r['dense_ms']:.3f} | {r['base_ms']:.3f} | "
                     f"{r['separate_ms']:.3f} | {r['fused_ms']:.3f} | {r['fused_vs_separate']:.2f}x | "
                     f"{r['fused_vs_dense']:.2f}x | {r['base_vs_dense']:.2f}x | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fmt", default="nf4")
    p.add_argument("--m", default="1,16,256")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    rows = [measure(args.fmt, int(m), args.k, args.n, args.rank, args.repeats)
            for m in args.m.split(",")]
    dev = jax.devices()[0]
    print(f"QLoRA forward, {args.fmt} base, K={args.k}, N={args.n}, rank {args.rank}, on "
          f"{dev.device_kind} ({jax.default_backend()}, qkern backend "
          f"{qkern.pallas._backend.resolve().name}), jax {jax.__version__}:")
    print(format_table(rows))


if __name__ == "__main__":
    main()
