"""Config sweep of the Mosaic TPU W8A8 kernel: every config checked against the reference
and timed, in the manner of JAX's own Pallas ops files (interpret mode here; compiled on
the device where the kernel runs, where the sweep offers it).

    python -m qkern._bench.sweep_mosaic_w8a8
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat
from ..pallas._config import MatmulConfig
from ..pallas.w8a8._mosaic import plan_mosaic_w8a8, w8a8_mosaic
from ..pallas.w8a8.base import w8a8_reference
from .operands import random_int8_operand


def main(argv=None) -> None:
    """Sweep a few shapes and configs in interpret mode (runs anywhere) and print the
    plan, the error against w8a8_reference, the interpret time and whether the kernel
    lowers for TPU. Interpret-mode times say nothing about TPU speed."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--m", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--block", type=int, default=0, help="weight block size (0: per channel)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    op = random_int8_operand(rng, args.k, args.n, args.block)
    configs = [None, MatmulConfig(block_m=32, block_n=128, block_k=1024)]
    rows = [("M", "config", "kernel", "bm/bn/tk", "scales", "k steps", "rel err",
             "interp s", "lowers")]
    for m in map(int, args.m.split(",")):
        x = jnp.asarray(rng.standard_normal((m, args.k)), jnp.float32)
        want = np.asarray(w8a8_reference(x, op))
        for i, cfg in enumerate(configs):
            p = plan_mosaic_w8a8(op, m, x.dtype, cfg)
            f = functools.partial(w8a8_mosaic, config=cfg)
            t0 = time.perf_counter()
            y = jax.block_until_ready(f(x, op, interpret=True))
            dt = time.perf_counter() - t0
            err = float(np.max(np.abs(np.asarray(y) - want)) / max(np.max(np.abs(want)), 1.0))
            try:
                text = _compat.export(f, "tpu", x, op).mlir_module()
                lowers = "yes" if "tpu_custom_call" in text else "NO"
            except Exception as e:                      # noqa: BLE001 - reported as "NO"
                lowers = f"NO ({type(e).__name__})"
            rows.append((m, "default" if cfg is None else f"#{i}", p.kernel,
                         f"{p.bm}/{p.bn}/{p.tk}", p.scale_mode, p.nk, f"{err:.1e}",
                         f"{dt:.2f}", lowers))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
