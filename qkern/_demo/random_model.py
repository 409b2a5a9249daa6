"""The built-in demo: a small transformer with random weights, quantised in several formats.

    python -m qkern._demo.random_model       # or: qkern demo --random

A pre-norm transformer (multi-head causal attention and a GELU MLP per layer) written as
plain JAX on a dict of parameters. `qkern.quantize(params, fmt, where=r".*kernel")` turns
every projection into a QArray; the unchanged model code runs under `qkern.quaxify`, so
each `x @ kernel` goes to qkern's quantised matmul. For each format it prints the weight
memory, the relative error of the output against the float32 model, and the run time
against the float32 model (both jitted, medians of calls taken in turns).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from .._bench.progress import bar
from .._bench.timing import interleaved_medians
from ..pallas._backend import resolve

FORMATS = ("int8", "int8 W8A8", "int4", "nf4", "fp8_e4m3")
# Rows that are a format plus quantize options: W8A8 quantises the activations to int8
# too (per row, on the fly) and runs an int8 x int8 product.
VARIANTS = {"int8 W8A8": ("int8", {"act_fmt": "int8"})}


def init_params(key, *, layers: int = 2, width: int = 256, heads: int = 4, ffn: int = 1024):
    """Random parameters; projections are [in, out] "kernel"s, as in Flax."""
    def dense(k, n_in, n_out):
        return {"kernel": jax.random.normal(k, (n_in, n_out), jnp.float32) / np.sqrt(n_in),
                "bias": jnp.zeros((n_out,), jnp.float32)}

    params = {"layers": []}
    for k in jax.random.split(key, layers):
        kq, kk, kv, ko, ku, kd = jax.random.split(k, 6)
        params["layers"].append({
            "ln1": {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))},
            "attn": {"query": dense(kq, width, width), "key": dense(kk, width, width),
                     "value": dense(kv, width, width), "out": dense(ko, width, width)},
            "ln2": {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))},
            "mlp": {"up": dense(ku, width, ffn), "down": dense(kd, ffn, width)},
        })
    params["ln_f"] = {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}
    return params, heads


def _ln(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def apply(params, x, heads: int):
    """x [batch, seq, width] -> [batch, seq, width]. Ordinary JAX: no qkern in sight."""
    b, s, d = x.shape
    mask = jnp.tril(jnp.ones((s, s), bool))
    for layer in params["layers"]:
        h = _ln(layer["ln1"], x)
        q, k, v = (_dense(layer["attn"][n], h).reshape(b, s, heads, d // heads)
                   for n in ("query", "key", "value"))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
        att = jax.nn.softmax(jnp.where(mask, att, -1e30), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, d)
        x = x + _dense(layer["attn"]["out"], o)
        h = _ln(layer["ln2"], x)
        x = x + _dense(layer["mlp"]["down"], jax.nn.gelu(_dense(layer["mlp"]["up"], h)))
    return _ln(params["ln_f"], x)


def _nbytes(tree) -> int:
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda v: isinstance(v, qkern.QArray)):
        if isinstance(leaf, qkern.QArray):
            total += leaf.nbytes()
        else:
            total += leaf.size * leaf.dtype.itemsize
    return total


def measure(formats=FORMATS, *, layers: int = 2, width: int = 256, ffn: int = 1024,
            tokens: int = 16, repeats: int = 10, progress: bool | None = None) -> list[dict]:
    """One row per format (and float32 first): weight bytes, error and time vs float32.
    progress: a bar on stderr, one step for float32 and three per format (quantise,
    compile and run, time); None: when stderr is a terminal."""
    with bar(1 + 3 * len(formats), "qkern demo", enabled=progress) as b:
        return _measure(b, formats, layers=layers, width=width, ffn=ffn, tokens=tokens,
                        repeats=repeats)


def _measure(b, formats, *, layers, width, ffn, tokens, repeats) -> list[dict]:
    b.set_postfix_str("float32: compile and run", refresh=False)
    kp, kx = jax.random.split(jax.random.PRNGKey(0))
    params, heads = init_params(kp, layers=layers, width=width, ffn=ffn)
    x = jax.random.normal(kx, (1, tokens, width), jnp.float32)
    dense_fn = jax.jit(lambda p, x: apply(p, x, heads))
    ref = np.asarray(dense_fn(params, x))
    dense_bytes = _nbytes(params)
    b.update()
    rows, dense_ms = [], []
    for fmt in formats:
        t0 = time.perf_counter()
        b.set_postfix_str(f"{fmt}: quantise", refresh=False)
        name, options = VARIANTS.get(fmt, (fmt, {}))
        qparams = qkern.quantize(params, name, where=r".*kernel", **options)
        b.update()
        b.set_postfix_str(f"{fmt}: compile and run")
        q_fn = jax.jit(qkern.quaxify(lambda p, x: apply(p, x, heads)))
        out = np.asarray(q_fn(qparams, x))
        setup = time.perf_counter() - t0
        b.update()
        b.set_postfix_str(f"{fmt}: time against float32")
        # dense and quantised calls in turns: the ratio holds on a shared machine
        t = interleaved_medians({"dense": lambda: dense_fn(params, x),
                                 "q": lambda: q_fn(qparams, x)}, repeats=repeats)
        b.update()
        dense_ms.append(t["dense"] * 1e3)
        nb = _nbytes(qparams)
        rows.append(dict(format=fmt, weight_bytes=nb, saved=1 - nb / dense_bytes,
                         rel_error=float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                         ms=t["q"] * 1e3, speedup=t["dense"] / t["q"], setup_s=setup))
    dense_row = dict(format="float32", weight_bytes=dense_bytes, saved=0.0, rel_error=0.0,
                     ms=float(np.median(dense_ms)) if dense_ms else float("nan"), speedup=1.0)
    return [dense_row] + rows


def format_table(rows) -> str:
    lines = ["| format | weights (MB) | memory saved | output rel. error vs float32 | "
             "time (ms) | speed vs float32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{100 * r['saved']:.0f}% | "
                     f"{'-' if r['format'] == 'float32' else format(r['rel_error'], '.1e')} | "
                     f"{r['ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def run(formats=FORMATS, *, layers: int = 2, width: int = 256, ffn: int = 1024,
        tokens: int = 16, repeats: int = 10, progress: bool | None = None) -> list[dict]:
    """Print the demo: what runs, the table, and how to read it. Returns the rows.
    progress: a bar on stderr while it measures (None: when stderr is a terminal)."""
    print(f"qkern demo: a {layers}-layer transformer (width {width}, MLP {ffn}, random "
          f"weights), {tokens} tokens, on {jax.devices()[0].device_kind} "
          f"(qkern backend: {resolve().name}).")
    print("Every projection kernel is quantised with qkern.quantize(params, fmt, "
          "where=r\".*kernel\"); the model code runs unchanged under qkern.quaxify.")
    print()
    t0 = time.perf_counter()
    rows = measure(formats, layers=layers, width=width, ffn=ffn, tokens=tokens,
                   repeats=repeats, progress=progress)
    print(format_table(rows))
    print()
    print("weights: all parameters (LayerNorms and biases stay float32). Error: relative "
          "L2 error of the output\nagainst the float32 model. Speed: float32 time / "
          "quantised time, both jitted, calls taken in turns (>1: faster).")
    print(f"({time.perf_counter() - t0:.1f} s. Next: `qkern bench` for the kernels alone, "
          "`qkern tune` to tune them for this machine.)")
    return rows


if __name__ == "__main__":
    run()
