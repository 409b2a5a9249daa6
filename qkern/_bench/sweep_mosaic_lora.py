"""Config sweep of the Mosaic TPU fused QLoRA kernel: every config checked against the reference
and timed, in the manner of JAX's own Pallas ops files (interpret mode here; compiled on
the device where the kernel runs, where the sweep offers it).

    python -m qkern._bench.sweep_mosaic_lora
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat
from ..recipes import quantize
from ..pallas._operand import canonical_operand
from ..pallas.lora_qmatmul._mosaic import lora_qmatmul_mosaic, plan_lora_mosaic
from ..pallas.lora_qmatmul.base import reference


def main():
    """Run the fused kernels in interpret mode on a few formats, shapes and directions;
    print the plan, the error against the reference, the time and whether the kernel
    lowers for TPU. Interpret-mode times say nothing about TPU speed."""
    head = ("format", "dir", "MxKxN", "r", "kernel", "xu", "rel err", "interp s", "lowers")
    rows = []
    for fmt, (m, k, n), r in [("int8", (1, 1024, 256), 8), ("nf4", (8, 2048, 256), 12),
                              ("int4", (64, 1024, 384), 16)]:
        kw, kx, ku, kv = jax.random.split(jax.random.PRNGKey(0), 4)
        op = canonical_operand(quantize(jax.random.normal(kw, (k, n)), fmt))
        for transposed in (False, True):
            din, dout = (n, k) if transposed else (k, n)
            x = jax.random.normal(kx, (m, din))
            u = jax.random.normal(ku, (din, r)) / np.sqrt(din)
            v = jax.random.normal(kv, (r, dout))
            f = functools.partial(lora_qmatmul_mosaic, scale=0.5, transposed=transposed)
            lp = plan_lora_mosaic(op, m, x.dtype, r, transposed=transposed)
            t0 = time.perf_counter()
            y, _ = jax.block_until_ready(f(x, op, u, v, interpret=True))
            dt = time.perf_counter() - t0
            want = reference(x, op, u, v, 0.5, transposed=transposed)[0]
            err = float(jnp.max(jnp.abs(y - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1.0))
            try:
                txt = _compat.export(f, "tpu", x, op, u, v).mlir_module()
                lowers = "yes" if "tpu_custom_call" in txt else "NO"
            except Exception:                          # noqa: BLE001 - reported as "NO"
                lowers = "NO"
            rows.append((fmt, "T" if transposed else "F", f"{m}x{k}x{n}", r, lp.base.kernel,
                         "shared" if lp.shared else "per tile", f"{err:.1e}", f"{dt:.2f}",
                         lowers))
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
