"""The native CPU kernel against the `xla` backend's scan, both against dense float32 `x @ w`,
for small M: where the one overtakes the other (`qkern.pallas.qmatmul._native.max_m`).

    python bench/native_crossover.py                        # K = N = 4096, M = 1,2,4,8,16
    python bench/native_crossover.py --m 8,12,16 --formats nf4 --repeats 30
    python bench/native_crossover.py --isa all --cold       # each variant this CPU runs
    python bench/native_crossover.py --k 384 --n 1536 --m 16,32,64 --dequantized

All calls (dense, and per format the kernel and the scan) are timed in turns in one
process; each cell is a speed-up over dense at that M. The two paths are checked against
each other before timing. `--isa avx2,avx512` (or `all`: every variant this CPU runs) times
those instruction-set variants of the kernel side by side, in the same turns; by default
only the one qkern picks ($QKERN_NATIVE_ISA caps it) runs. A call that follows another on
the same weight finds much of it in cache (a 4096 x 4096 int4 weight is 8 MiB): `--cold`
reads a 128 MiB buffer before every timed call, so that every call reads its weight from
memory, as a decode step through a large model does; compare variants with it.
`--dequantized` adds dequantise-then-dot (`MatmulConfig(dequantize=True)`, the native decode
then XLA's dot), what the `xla` backend runs for small weights from M = 128: where the
kernel should hand over (`_native.max_m`).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from qkern._bench.timing import interleaved_medians
from qkern.pallas.qmatmul import _native
from qkern.pallas.qmatmul._native import _build
from qkern.pallas import MatmulConfig, qmatmul
from qkern.pallas._config import default_config
from qkern.pallas._operand import stored_operand
from qkern.pallas.qmatmul._xla import _scan_matmul


def _limit(op) -> str:
    """Where the native kernel runs for float32 x: "M <= 48", or every M (the GEMM above)."""
    m = _native.max_m(op)
    return "every M (a blocked GEMM from M = 49)" if m == sys.maxsize else f"M <= {m}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", default="1,2,4,8,16")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--formats", default="nf4,int4,int8")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--cold", action="store_true",
                   help="evict the caches before every timed call (128 MiB read)")
    p.add_argument("--isa", default="", help="kernel variants to time: comma-separated, or "
                   "all (every one this CPU runs); default: the one qkern picks")
    p.add_argument("--dequantized", action="store_true",
                   help="also time dequantise-then-dot (MatmulConfig(dequantize=True))")
    a = p.parse_args(argv)
    if _native.library() is None:
        raise SystemExit(f"the native CPU kernels are {_native.status()}")
    runnable = _build.runnable_variants()
    isas = (runnable if a.isa == "all" else a.isa.split(",") if a.isa else [_native.variant()])
    for v in isas:
        if v not in runnable or _build._open(_build._compiler(), v) is None:
            raise SystemExit(f"variant {v!r} does not run here (runs: {', '.join(runnable)})")
    label = (lambda v: "native") if not a.isa else (lambda v: v)
    ms = [int(v) for v in a.m.split(",")]
    fmts = a.formats.split(",")
    w = jax.random.normal(jax.random.PRNGKey(0), (a.k, a.n)) * 0.02
    ops = {f: stored_operand(qkern.quantize(w, f)) for f in fmts}
    dense = jax.jit(lambda x, w: x @ w)
    native = jax.jit(_native._native, static_argnames="isa")
    dequantised = jax.jit(lambda x, op: qmatmul(x, op, backend="xla",
                                                config=MatmulConfig(dequantize=True)))
    scans = {m: jax.jit(lambda x, op, c=default_config("xla", m): _scan_matmul(x, op, c))
             for m in ms}
    timers = {}
    for m in ms:
        x = jax.random.normal(jax.random.PRNGKey(m), (m, a.k))
        timers[("dense", m)] = lambda x=x: dense(x, w)
        for f, op in ops.items():
            want = np.asarray(scans[m](x, op))
            for v in isas:
                got = np.asarray(native(x, op, isa=v))
                err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
                if err > 1e-5:
                    raise AssertionError(f"{f} M={m}: the {v} kernel and the scan disagree "
                                         f"({err:.1e})")
                timers[(f, v, m)] = lambda x=x, op=op, v=v: native(x, op, isa=v)
            timers[(f, "scan", m)] = lambda x=x, op=op, s=scans[m]: s(x, op)
            if a.dequantized:
                timers[(f, "dequantised", m)] = lambda x=x, op=op: dequantised(x, op)
    if a.cold:   # a flush before each timed call, timed too but not reported
        big = jnp.ones((32, 1 << 20), jnp.float32)
        flush = jax.jit(lambda b: b.sum())
        timers = {k: v for key, fn in timers.items()
                  for k, v in ((("flush", key), lambda: flush(big)), (key, fn))}
    t = interleaved_medians(timers, repeats=a.repeats)
    print(f"Native kernel and scan, speed-up over dense float32, x[M, {a.k}] @ W[{a.k}, {a.n}], "
          f"on {jax.devices()[0].device_kind} (jax {jax.__version__}); kernel runs for "
          f"{_limit(next(iter(ops.values())))}; kernel variants: {', '.join(isas)}"
          + ("; caches evicted before every call" if a.cold else ""))
    paths = ["scan"] + (["dequantised"] if a.dequantized else [])
    cols = [(f, v) for f in fmts for v in [*isas, *paths]]
    print("| M | dense (ms) | " + " | ".join(
        f"{f} {v if v in paths else label(v)}" for f, v in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for m in ms:
        d = t[("dense", m)]
        cells = " | ".join(f"{d / t[(f, v, m)]:.2f}x" for f, v in cols)
        print(f"| {m} | {d * 1e3:.2f} | {cells} |")


if __name__ == "__main__":
    main()
