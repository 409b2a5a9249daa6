"""Config sweep of the Triton qmatmul kernels (x @ W and dy @ W.T): every config checked against the reference
and timed, in the manner of JAX's own Pallas ops files (interpret mode here; compiled on
the device where the kernel runs, where the sweep offers it).

    python -m qkern._bench.sweep_triton_qmatmul
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..recipes import quantize
from ..pallas._config import MatmulConfig
from ..pallas._operand import canonical_operand
from ..pallas.qmatmul._triton import (_plan, qmatmul_t_triton, qmatmul_triton, reference, reference_t)


def main(argv: Any = None) -> None:
    """Sweep a few configs in interpret mode and print error and time per kernel.

    Interpret-mode times say nothing about GPU speed; the table checks that every
    config is accepted and matches the reference. On a GPU, pass --device to run the
    compiled kernels instead.
    """
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--device", action="store_true", help="compiled kernels (needs a GPU)")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--formats", default="int8,int4,nf4,fp8_e4m3")
    ap.add_argument("--m", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--configs", type=int, default=None, help="sweep only the first N")
    args = ap.parse_args(argv)
    interpret = not args.device
    kw, kx = jax.random.split(jax.random.PRNGKey(0))
    w = jax.random.normal(kw, (args.k, args.n), jnp.float32)
    configs = [
        MatmulConfig(block_m=16, block_n=64, block_k=64, split_k=1),
        MatmulConfig(block_m=16, block_n=64, block_k=256, split_k=4),
        MatmulConfig(block_m=32, block_n=128, block_k=128),
    ][:args.configs]
    print(f"{'format':10} {'kernel':10} {'M':>4} {'bm':>4} {'bn':>4} {'bk':>4} "
          f"{'split':>5} {'max rel err':>12} {'ms':>9}")
    for fmt in args.formats.split(","):
        op = canonical_operand(quantize(w, fmt))
        for m in map(int, args.m.split(",")):
            x = jax.random.normal(kx, (m, args.k), jnp.float32).astype(jnp.bfloat16)
            dy = jax.random.normal(kx, (m, args.n), jnp.float32).astype(jnp.bfloat16)
            for cfg in configs:
                for kind, fn, ref, a in (("fwd", qmatmul_triton, reference, x),
                                         ("bwd_x", qmatmul_t_triton, reference_t, dy)):
                    out = fn(a, op, cfg, interpret=interpret).block_until_ready()
                    t0 = time.perf_counter()
                    out = fn(a, op, cfg, interpret=interpret).block_until_ready()
                    ms = 1e3 * (time.perf_counter() - t0)
                    want = np.asarray(ref(a, op), np.float32)
                    err = np.max(np.abs(np.asarray(out, np.float32) - want))
                    err /= max(float(np.max(np.abs(want))), 1.0)
                    p = _plan(op, m, cfg, transposed=kind != "fwd")
                    print(f"{fmt:10} {kind:10} {m:4d} {p.bm:4d} {p.bn:4d} {p.bk:4d} "
                          f"{p.split:5d} {err:12.2e} {ms:9.2f}")


if __name__ == "__main__":
    main()
