"""Convolution: a ResNet-style 3x3 convolution with a quantised kernel against the dense one.

For each shape (batch, spatial size, channels in = out), NHWC/HWIO, stride 1, SAME padding:
the dense float32 convolution, the same convolution after dequantising the kernel (what a
user could write by hand: `conv(x, qkern.dequantize(q))` under jit), and qkern's quantised
convolution for each format (weight-only) and for int8 W8A8 (`act_fmt="int8"`, int8
convolutions tap by tap). All jitted and timed in turns in one process
(`interleaved_medians`), so the ratios hold on a busy machine.
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
DEFAULT_SHAPES = ((8, 28, 128), (8, 14, 256), (1, 7, 512))


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def run(formats=DEFAULT_FORMATS, shapes=None, repeats: int = 10,
        progress: bool | None = None) -> list[dict]:
    """One row per (shape, entry): ms, kernel bytes, speed-up over the dense float32
    convolution and over dequantise-then-convolve, relative error against float32."""
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    rows = []
    entries = ["float32"] + [f for f in formats] + ["int8 W8A8"]
    with bar(len(shapes) * len(entries), "qkern bench conv", enabled=progress) as b:
        for batch, size, ch in shapes:
            b.set_postfix_str(f"{batch}x{size}x{size}x{ch}")
            kx, kw = jax.random.split(jax.random.PRNGKey(size * ch))
            x = jax.random.normal(kx, (batch, size, size, ch), jnp.float32)
            w = jax.random.normal(kw, (3, 3, ch, ch), jnp.float32) / np.sqrt(9 * ch)
            dense = jax.jit(_conv)
            quantised = jax.jit(qkern.quaxify(_conv))
            by_hand = jax.jit(lambda x, q: _conv(x, qkern.dequantize(q)))
            fns = {"float32": lambda: dense(x, w)}
            sizes = {"float32": nbytes(w)}
            qs = {}
            for fmt in list(formats) + ["int8 W8A8"]:
                q = (qkern.quantize(w, "int8", act_fmt="int8") if fmt == "int8 W8A8"
                     else qkern.quantize(w, fmt))
                qs[fmt] = q
                fns[fmt] = lambda q=q: quantised(x, q)
                sizes[fmt] = nbytes(q)
                if fmt != "int8 W8A8":
                    fns[f"{fmt} by hand"] = lambda q=q: by_hand(x, q)
            times = interleaved_medians(fns, repeats=repeats)
            ref = np.asarray(fns["float32"](), np.float32)
            for name in entries:
                out = np.asarray(fns[name](), np.float32)
                t = times[name]
                hand = times.get(f"{name} by hand")
                rows.append(dict(
                    shape=f"{batch}x{size}x{size}x{ch}", entry=name, ms=t * 1e3,
                    kernel_bytes=sizes[name], speedup_vs_f32=times["float32"] / t,
                    speedup_vs_dequantize_first=None if hand is None else hand / t,
                    rel_error=float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                    device=str(jax.devices()[0].device_kind)))
                b.update()
    return rows


def format_table(rows) -> str:
    lines = ["| x (NHWC), 3x3 kernel C->C | kernel | ms | kernel KB | vs float32 | "
             "vs dequantise-then-conv | rel. error vs float32 |", "|" + "---|" * 7]
    for r in rows:
        hand = r["speedup_vs_dequantize_first"]
        lines.append(
            f"| {r['shape']} | {r['entry']} | {r['ms']:.2f} | {r['kernel_bytes'] / 1e3:.0f} | "
            f"{r['speedup_vs_f32']:.2f}x | {'-' if hand is None else f'{hand:.2f}x'} | "
            f"{r['rel_error']:.1e} |")
    return "\n".join(lines)
