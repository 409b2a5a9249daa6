"""Quantised matmul against the dense matmul, measured in the same run.

On CPU the dense baseline is float32 `x @ w`; on GPU/TPU, bfloat16. For each format and M:
median times, speed-up (dense / quantised), weight bytes, achieved GB/s over the weight
bytes, and the relative error against x @ dequantise(W). Also dequantise-then-dot, what
other libraries do on CPU, as the bar to leave behind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from .timing import median_time

DEFAULT_FORMATS = ("int8", "int4", "nf4")


def run(formats=DEFAULT_FORMATS, ms=(1, 16), k: int = 4096, n: int = 4096,
        repeats: int = 20, include_dequant: bool = True) -> list[dict]:
    platform = jax.default_backend()
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    kw, kx = jax.random.split(jax.random.PRNGKey(0))
    w = jax.random.normal(kw, (k, n), jnp.float32).astype(dtype)
    dense = jax.jit(lambda x, w: x @ w)
    rows = []
    for fmt in formats:
        qw = qkern.quantize(w, fmt)
        qmm = jax.jit(qkern.quaxify(lambda x, w: x @ w))
        deq = jax.jit(lambda x, w: x @ w.materialise())
        wd = qw.materialise()
        for m in ms:
            x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
            t_dense = median_time(lambda: dense(x, w), repeats=repeats)
            t_q = median_time(lambda: qmm(x, qw), repeats=repeats)
            ref = np.asarray((x.astype(jnp.float32) @ wd.astype(jnp.float32)))
            got = np.asarray(qmm(x, qw).astype(jnp.float32))
            row = dict(format=fmt, m=m, k=k, n=n, dtype=jnp.dtype(dtype).name,
                       dense_ms=t_dense * 1e3, qkern_ms=t_q * 1e3, speedup=t_dense / t_q,
                       weight_bytes=qw.nbytes(), dense_bytes=int(w.size * w.dtype.itemsize),
                       gbps=qw.nbytes() / t_q / 1e9,
                       rel_error=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
            if include_dequant:
                t_d = median_time(lambda: deq(x, qw), repeats=max(3, repeats // 4))
                row["dequant_then_dot_speedup"] = t_dense / t_d
            rows.append(row)
    return rows


def format_table(rows) -> str:
    head = ("| format | M | dense (ms) | qkern (ms) | speed-up vs dense | dequantise-then-dot "
            "vs dense | weight MB (dense MB) | GB/s | rel. error |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dq = r.get("dequant_then_dot_speedup")
        lines.append(
            f"| {r['format']} | {r['m']} | {r['dense_ms']:.2f} | {r['qkern_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {'' if dq is None else f'{dq:.2f}x'} | "
            f"{r['weight_bytes'] / 1e6:.1f} ({r['dense_bytes'] / 1e6:.1f}) | {r['gbps']:.1f} | "
            f"{r['rel_error']:.1e} |")
    return "\n".join(lines)
