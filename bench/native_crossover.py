"""The native CPU kernel against the `xla` backend's scan, both against dense float32 `x @ w`,
for small M: where the one overtakes the other (`qkern.pallas.qmatmul._native.max_m`).

    python bench/native_crossover.py                        # K = N = 4096, M = 1,2,4,8,16
    python bench/native_crossover.py --m 8,12,16 --formats nf4 --repeats 30

All calls (dense, and per format the kernel and the scan) are timed in turns in one
process; each cell is a speed-up over dense at that M. The two paths are checked against
each other before timing.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import qkern
from qkern._bench.timing import interleaved_medians
from qkern.pallas.qmatmul import _native
from qkern.pallas._config import default_config
from qkern.pallas._operand import stored_operand
from qkern.pallas.qmatmul._xla import _scan_matmul


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", default="1,2,4,8,16")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--formats", default="nf4,int4,int8")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    if _native.library() is None:
        raise SystemExit(f"the native CPU kernels are {_native.status()}")
    ms = [int(v) for v in a.m.split(",")]
    fmts = a.formats.split(",")
    w = jax.random.normal(jax.random.PRNGKey(0), (a.k, a.n)) * 0.02
    ops = {f: stored_operand(qkern.quantize(w, f)) for f in fmts}
    dense = jax.jit(lambda x, w: x @ w)
    native = jax.jit(_native._native)
    scans = {m: jax.jit(lambda x, op, c=default_config("xla", m): _scan_matmul(x, op, c))
             for m in ms}
    timers = {}
    for m in ms:
        x = jax.random.normal(jax.random.PRNGKey(m), (m, a.k))
        timers[("dense", m)] = lambda x=x: dense(x, w)
        for f, op in ops.items():
            got, want = np.asarray(native(x, op)), np.asarray(scans[m](x, op))
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
            if err > 1e-5:
                raise AssertionError(f"{f} M={m}: the kernel and the scan disagree ({err:.1e})")
            timers[(f, "native", m)] = lambda x=x, op=op: native(x, op)
            timers[(f, "scan", m)] = lambda x=x, op=op, s=scans[m]: s(x, op)
    t = interleaved_medians(timers, repeats=a.repeats)
    print(f"Native kernel and scan, speed-up over dense float32, x[M, {a.k}] @ W[{a.k}, {a.n}], "
          f"on {jax.devices()[0].device_kind} (jax {jax.__version__}); kernel runs for "
          f"M <= {_native.max_m(next(iter(ops.values())))}")
    print("| M | dense (ms) | " + " | ".join(f"{f} native | {f} scan" for f in fmts) + " |")
    print("|---|---|" + "---|---|" * len(fmts))
    for m in ms:
        d = t[("dense", m)]
        cells = " | ".join(f"{d / t[(f, 'native', m)]:.2f}x | {d / t[(f, 'scan', m)]:.2f}x"
                           for f in fmts)
        print(f"| {m} | {d * 1e3:.2f} | {cells} |")


if __name__ == "__main__":
    main()
