"""Config sweep of the Triton W8A8 kernel: every config checked against the reference
and timed, in the manner of JAX's own Pallas ops files (interpret mode here; compiled on
the device where the kernel runs, where the sweep offers it).

    python -m qkern._bench.sweep_triton_w8a8
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..pallas._config import MatmulConfig
from ..pallas.w8a8._triton import plan_triton_w8a8, w8a8_triton
from ..pallas.w8a8.base import w8a8_reference
from .operands import random_int8_operand


def main(argv=None) -> None:
    """Sweep a few configs and print the plan, the error against w8a8_reference and the
    time per call, next to the XLA bfloat16 dot of the same shape.

    Interpret mode by default (any machine; the times say nothing about a GPU); --device
    runs the compiled kernel on an NVIDIA GPU.
    """
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--device", action="store_true", help="compiled kernels (needs a GPU)")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--m", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--block", type=int, default=0, help="weight block size (0: per channel)")
    ap.add_argument("--configs", type=int, default=None, help="sweep only the first N")
    args = ap.parse_args(argv)
    interpret = not args.device
    rng = np.random.default_rng(0)
    op = random_int8_operand(rng, args.k, args.n, args.block)
    w_bf16 = (jnp.asarray(rng.standard_normal((args.k, args.n)), jnp.bfloat16))
    configs = [None,
               MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=1),
               MatmulConfig(block_m=64, block_n=128, block_k=128, split_k=4)][:args.configs]

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        t0 = time.perf_counter()
        out = jax.block_until_ready(f(*a))
        return out, 1e3 * (time.perf_counter() - t0)

    print(f"{'M':>5} {'config':8} {'bm':>4} {'bn':>4} {'bk':>4} {'split':>5} "
          f"{'max rel err':>12} {'ms':>9} {'bf16 dot ms':>12}")
    for m in map(int, args.m.split(",")):
        x = jnp.asarray(rng.standard_normal((m, args.k)), jnp.bfloat16)
        _, t_dense = timed(jax.jit(jnp.dot), x, w_bf16)
        want = np.asarray(w8a8_reference(x, op), np.float32)
        for i, cfg in enumerate(configs):
            p = plan_triton_w8a8(op, m, cfg)
            y, ms = timed(functools.partial(w8a8_triton, config=cfg, interpret=interpret), x, op)
            err = np.max(np.abs(np.asarray(y, np.float32) - want))
            err /= max(float(np.max(np.abs(want))), 1.0)
            print(f"{m:5d} {'default' if cfg is None else f'#{i}':8} {p.bm:4d} {p.bn:4d} "
                  f"{p.bk:4d} {p.split:5d} {err:12.2e} {ms:9.3f} {t_dense:12.3f}")


if __name__ == "__main__":
    main()
