"""Decode: time per token through a stack of layers whose weights exceed the last-level cache.

One token (x of one row) goes through `layers` square `width x width` weights, stacked and
run by `lax.scan` (`h = rms_normalise(h @ W_l)`), the shape of one decode step of a large
model's matmuls. The default, 32 layers of 4096 x 4096, is 2 GB in float32: every step
streams every weight from memory, so the time per token is what the bytes cost. Each
format is timed against the same stack in float32 and in bfloat16 (dense), all in turns
in one process (`interleaved_medians`), so the ratios hold on a busy machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from ..recipes._rule import nbytes
from .progress import bar
from .timing import interleaved_medians

DEFAULT_FORMATS = ("int8", "int4", "nf4")


def _step(x, ws):
    def layer(h, w):
        h = h @ w
        h32 = h.astype(jnp.float32)
        return (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32) + 1e-6)).astype(h.dtype), None
    return jax.lax.scan(layer, x, ws)[0]


def run(formats=DEFAULT_FORMATS, layers: int = 32, width: int = 4096, repeats: int = 5,
        progress: bool | None = None) -> list[dict]:
    """One row per entry (float32, bfloat16, then each format): ms per token, tokens/s,
    weight bytes and speed-ups over float32 and bfloat16, and the output's error against
    float32. progress: a bar on stderr (None: when stderr is a terminal)."""
    with bar(len(formats) + 2, "qkern bench decode", enabled=progress) as b:
        b.set_postfix_str("float32 weights")
        key = jax.random.PRNGKey(0)
        ws = jax.random.normal(key, (layers, width, width), jnp.float32) / np.sqrt(width)
        x = jax.random.normal(jax.random.PRNGKey(1), (1, width), jnp.float32)
        dense = jax.jit(_step)
        candidates = {"float32": (lambda: dense(x, ws), nbytes(ws))}
        wb = ws.astype(jnp.bfloat16)
        xb = x.astype(jnp.bfloat16)
        candidates["bfloat16"] = (lambda: dense(xb, wb), nbytes(wb))
        b.update()
        quantised = jax.jit(qkern.quaxify(_step))
        for fmt in formats:
            b.set_postfix_str(f"quantising to {fmt}")
            q = qkern.quantize(ws, fmt)
            candidates[fmt] = (lambda q=q: quantised(x, q), nbytes(q))
            b.update()
        b.set_postfix_str("timing")
        times = interleaved_medians({k: fn for k, (fn, _) in candidates.items()},
                                    repeats=repeats)
        ref = np.asarray(candidates["float32"][0](), np.float32)
        rows = []
        for name, (fn, size) in candidates.items():
            out = np.asarray(fn(), np.float32)
            t = times[name]
            rows.append(dict(
                entry=name, layers=layers, width=width, ms_per_token=t * 1e3,
                tokens_per_s=1.0 / t, weight_bytes=size,
                speedup_vs_f32=times["float32"] / t, speedup_vs_bf16=times["bfloat16"] / t,
                gbps=size / t / 1e9,
                rel_error=float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                device=str(jax.devices()[0].device_kind)))
        b.update()
    return rows


def format_table(rows) -> str:
    lines = ["| weights | ms / token | tokens / s | weight MB | GB/s | vs float32 | vs bfloat16 | "
             "rel. error vs float32 |", "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['entry']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['weight_bytes'] / 1e6:.1f} | {r['gbps']:.1f} | {r['speedup_vs_f32']:.2f}x | "
            f"{r['speedup_vs_bf16']:.2f}x | {r['rel_error']:.1e} |")
    return "\n".join(lines)
