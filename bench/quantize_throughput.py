"""How fast `qkern.quantize` turns a float32 weight into codes, against one memory pass.

    python bench/quantize_throughput.py                       # [4096, 14336], nf4 int8 int4 fp4
    python bench/quantize_throughput.py --shape 4096,4096 --formats nf4,mxfp4 --repeats 5

Every format and the reference passes (`w * 2`: read the weight and write as many bytes;
`sum(w)`: read it only) are timed in turns in one process (`interleaved_medians`), so the ratios hold on a busy
machine. GB/s counts the float32 weight's bytes once. "searchsorted nf4" is the nearest-code
search qkern used before (a binary search, then a gather), kept here as the baseline.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from qkern._bench.timing import interleaved_medians
from qkern.formats import _quantize


def _searchsorted_code(y, codebook):
    order = np.argsort(codebook, kind="stable")
    s = codebook[order]
    pos = jnp.searchsorted(jnp.asarray((s[1:] + s[:-1]) / 2), y, side="left")
    return jnp.asarray(order.astype(np.uint8))[pos]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096,14336", help="K,N of the float32 weight")
    p.add_argument("--formats", default="nf4,int8,int4,fp4", help="comma-separated formats")
    p.add_argument("--repeats", type=int, default=7, help="timed turns per entry")
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(","))
    w = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
    double, total = jax.jit(lambda w: w * 2), jax.jit(jnp.sum)
    fns = {"one pass (w * 2)": lambda: double(w), "read only (sum)": lambda: total(w)}
    for fmt in a.formats.split(","):
        fns[fmt] = lambda fmt=fmt: qkern.quantize(w, fmt).data
    if "nf4" in a.formats.split(","):
        # the previous nearest-code search, same quantiser otherwise
        shipped = _quantize.nearest_code
        old = jax.jit(lambda w: _quantize.quantize_array(w, "nf4", axis=0)["data"])
        _quantize.nearest_code = _searchsorted_code
        try:
            compiled_old = old.lower(w).compile()     # traced with the old search
        finally:
            _quantize.nearest_code = shipped
        fns["searchsorted nf4"] = lambda: compiled_old(w)
    t = interleaved_medians(fns, repeats=a.repeats)
    gb = w.size * 4 / 1e9
    base = t["one pass (w * 2)"]
    print(f"quantize {shape} float32 ({gb:.2f} GB), {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print("| what | ms | GB/s | x one pass |")
    print("|---|---|---|---|")
    for name, s in t.items():
        print(f"| {name} | {s * 1e3:.0f} | {gb / s:.2f} | {base / s:.2f} |")


if __name__ == "__main__":
    main()
