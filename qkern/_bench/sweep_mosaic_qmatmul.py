"""Config sweep of the Mosaic TPU qmatmul kernels: every config checked against the reference
and timed, in the manner of JAX's own Pallas ops files (interpret mode here; compiled on
the device where the kernel runs, where the sweep offers it).

    python -m qkern._bench.sweep_mosaic_qmatmul
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from ..recipes import quantize
from ..pallas._config import MatmulConfig
from ..pallas._operand import canonical_operand
from ..pallas.qmatmul._mosaic import (_lowers_for_tpu, plan_mosaic, qmatmul_mosaic, qmatmul_reference)


def main():
    """Sweep a few formats, shapes and configs in interpret mode (this runs anywhere) and
    print the plan, the error against the reference, the interpret time and whether the
    kernel lowers for TPU. Interpret-mode times say nothing about TPU speed."""
    rows = []
    sweeps = [
        ("int8", {}, (1, 1024, 512), [None, MatmulConfig(block_n=128, block_k=256)]),
        ("int4", {}, (8, 4096, 512), [None, MatmulConfig(block_n=256, block_k=1024)]),
        ("nf4", {}, (1, 2048, 384), [None, MatmulConfig(block_n=128, block_k=512)]),
        ("fp8_e4m3", {}, (64, 1024, 256), [None, MatmulConfig(block_m=32, block_k=512)]),
        ("int4", dict(calibration="minmax"), (256, 1024, 256), [None]),
    ]
    for fmt, opts, (m, k, n), configs in sweeps:
        kw, kx = jax.random.split(jax.random.PRNGKey(0))
        w = jax.random.normal(kw, (k, n), jnp.float32)
        x = jax.random.normal(kx, (m, k), jnp.float32)
        op = canonical_operand(quantize(w, fmt, **opts))
        want = qmatmul_reference(x, op)
        for cfg in configs:
            plan = plan_mosaic(op, m, x.dtype, cfg)
            f = functools.partial(qmatmul_mosaic, config=cfg)
            t0 = time.perf_counter()
            y = jax.block_until_ready(f(x, op, interpret=True))
            dt = time.perf_counter() - t0
            err = float(jnp.max(jnp.abs(y - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1.0))
            rows.append((fmt + ("-minmax" if opts else ""), f"{m}x{k}x{n}", plan.kernel,
                         f"{plan.bm}/{plan.bn}/{plan.td}", plan.scale_mode, plan.nk,
                         f"{err:.1e}", f"{dt:.2f}", "yes" if _lowers_for_tpu(f, x, op) else "NO"))
    head = ("format", "MxKxN", "kernel", "bm/bn/bk", "scales", "k steps", "rel err",
            "interp s", "lowers")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
