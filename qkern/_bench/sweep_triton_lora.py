"""Config sweep of the Triton fused QLoRA kernel: every config checked against the reference
and timed, in the manner of JAX's own Pallas ops files (interpret mode here; compiled on
the device where the kernel runs, where the sweep offers it).

    python -m qkern._bench.sweep_triton_lora
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..recipes import quantize
from ..pallas._config import MatmulConfig
from ..pallas._operand import canonical_operand
from ..pallas.lora_qmatmul._triton import lora_qmatmul_triton
from ..pallas.lora_qmatmul.base import reference


def main(argv: Any = None) -> None:
    """Run the fused kernels over a few formats, M and configs; print the error against
    the plain-jnp reference and the time. Interpret-mode times say nothing about GPU
    speed; pass --device on a GPU."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--device", action="store_true", help="compiled kernels (needs a GPU)")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--formats", default="int8,nf4")
    ap.add_argument("--m", default="1,64")
    args = ap.parse_args(argv)
    interpret = not args.device
    kw, kx, ku, kv = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(kw, (args.k, args.n), jnp.float32)
    configs = [None, MatmulConfig(block_m=32, block_n=64, block_k=64, split_k=2)]
    print(f"{'format':9} {'dir':4} {'M':>4} {'config':>10} {'max rel err':>12} {'ms':>9}")
    for fmt in args.formats.split(","):
        op = canonical_operand(quantize(w, fmt))
        for m in map(int, args.m.split(",")):
            for transposed in (False, True):
                din, dout = (args.n, args.k) if transposed else (args.k, args.n)
                x = jax.random.normal(kx, (m, din)).astype(jnp.bfloat16)
                u = jax.random.normal(ku, (din, args.r)) / np.sqrt(din)
                v = jax.random.normal(kv, (args.r, dout))
                for cfg in configs:
                    f = functools.partial(lora_qmatmul_triton, config=cfg,
                                          transposed=transposed, interpret=interpret)
                    jax.block_until_ready(f(x, op, u, v, 0.5))
                    t0 = time.perf_counter()
                    y, _ = jax.block_until_ready(f(x, op, u, v, 0.5))
                    ms = 1e3 * (time.perf_counter() - t0)
                    want = np.asarray(reference(x, op, u, v, 0.5, transposed=transposed)[0],
                                      np.float32)
                    err = np.max(np.abs(np.asarray(y, np.float32) - want))
                    err /= max(float(np.max(np.abs(want))), 1.0)
                    tag = "default" if cfg is None else f"{cfg.block_k}/s{cfg.split_k}"
                    print(f"{fmt:9} {'T' if transposed else 'F':4} {m:4d} {tag:>10} "
                          f"{err:12.2e} {ms:9.2f}")


if __name__ == "__main__":
    main()
