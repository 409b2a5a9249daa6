"""Quantised matmul against the dense matmul, measured in the same run.

On CPU the dense baseline is float32 `x @ w`; on GPU/TPU, bfloat16. For each format and M:
median times (dense and quantised calls taken in turns, so load from other processes
falls on both alike), speed-up (dense / quantised), weight bytes, achieved GB/s over the bytes one
call moves (quantised weight + x + y), % of the device's memory roofline where its peak
bandwidth is known (roofline.py), the config the kernel ran (tuned or heuristic), and two
relative errors: the kernel against x @ dequantise(W) (summation order only) and against
the dense x @ w (what quantisation costs). Also dequantise-then-dot, what other libraries
do on CPU, as the bar to leave behind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from ..autotune import _cache
from ..autotune._tune import describe_config
from ..pallas._backend import resolve
from ..pallas._config import Problem, config_for
from ..pallas._operand import stored_operand
from ..pallas.qmatmul import _native
from .progress import bar
from .roofline import peak_bandwidth
from .timing import interleaved_medians, median_time

DEFAULT_FORMATS = ("int8", "int4", "nf4")


def _config_used(x, qw) -> tuple[str, bool]:
    """(the config the kernel runs for x @ qw, whether it came from the autotune cache)."""
    sel = resolve()
    op = stored_operand(qw)
    if op is None:
        return "", False
    x2 = x.reshape(-1, x.shape[-1])
    if sel.name == "xla" and not sel.interpret and _native.eligible(x2, op):
        return "native", False
    problem = Problem.of(sel.name, x2, op, "qmatmul")
    tuned = _cache.lookup(problem) is not None and not sel.interpret
    return describe_config(config_for(problem, interpret=sel.interpret), sel.name), tuned


def _rel(got, ref) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def run(formats=DEFAULT_FORMATS, ms=(1, 16), k: int = 4096, n: int = 4096,
        repeats: int = 20, include_dequant: bool = True,
        bandwidth_gbps: float | None = None, progress: bool | None = None) -> list[dict]:
    """One row per format and M (see the module docstring). progress: a bar on stderr,
    one step per row (None: when stderr is a terminal)."""
    with bar(len(formats) * len(ms), "qkern bench qmatmul", enabled=progress) as b:
        return _run(b, formats, ms, k, n, repeats, include_dequant, bandwidth_gbps)


def _run(b, formats, ms, k, n, repeats, include_dequant, bandwidth_gbps) -> list[dict]:
    platform = jax.default_backend()
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    device_kind = _cache.device_kind()              # for CPUs: the processor model and core count
    peak = bandwidth_gbps or peak_bandwidth(device_kind)
    itemsize = jnp.dtype(dtype).itemsize
    kw, kx = jax.random.split(jax.random.PRNGKey(0))
    w = jax.random.normal(kw, (k, n), jnp.float32).astype(dtype)
    w32 = np.asarray(w.astype(jnp.float32))
    dense = jax.jit(lambda x, w: x @ w)
    rows = []
    for fmt in formats:
        qw = qkern.quantize(w, fmt)
        qmm = jax.jit(qkern.quaxify(lambda x, w: x @ w))
        deq = jax.jit(lambda x, w: x @ w.materialise())
        wd = np.asarray(qw.materialise().astype(jnp.float32))
        for m in ms:
            b.set_postfix_str(f"{fmt} M={m}")
            x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
            t = interleaved_medians({"dense": lambda: dense(x, w), "q": lambda: qmm(x, qw)},
                                    repeats=repeats)
            t_dense, t_q = t["dense"], t["q"]
            x32 = np.asarray(x.astype(jnp.float32))
            got = np.asarray(qmm(x, qw).astype(jnp.float32))
            act_bytes = (m * k + m * n) * itemsize
            moved = qw.nbytes() + act_bytes
            dense_moved = w.size * itemsize + act_bytes
            config, tuned = _config_used(x, qw)
            row = dict(format=fmt, m=m, k=k, n=n, dtype=jnp.dtype(dtype).name,
                       device=device_kind, dense_ms=t_dense * 1e3, qkern_ms=t_q * 1e3,
                       speedup=t_dense / t_q, weight_bytes=qw.nbytes(),
                       dense_bytes=int(w.size * itemsize), bytes_moved=int(moved),
                       gbps=moved / t_q / 1e9, dense_gbps=dense_moved / t_dense / 1e9,
                       peak_gbps=peak,
                       roofline_pct=None if peak is None else 100 * moved / t_q / 1e9 / peak,
                       dense_roofline_pct=(None if peak is None
                                           else 100 * dense_moved / t_dense / 1e9 / peak),
                       config=config, tuned=tuned,
                       rel_error=_rel(got, x32 @ wd), quant_error=_rel(got, x32 @ w32))
            if include_dequant:
                t_d = median_time(lambda: deq(x, qw), repeats=max(3, repeats // 4))
                row["dequant_then_dot_speedup"] = t_dense / t_d
            rows.append(row)
            b.update()
    return rows


def _pct(v) -> str:
    return "" if v is None else f"{v:.0f}%"


def format_table(rows) -> str:
    head = ("| format | M | dense (ms) | qkern (ms) | speed-up vs dense | dequantise-then-dot "
            "vs dense | weight MB (dense MB) | GB/s (dense) | % roofline (dense) | config | "
            "rel. error (kernel) | rel. error vs dense W |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        dq = r.get("dequant_then_dot_speedup")
        roof = "" if r.get("roofline_pct") is None else (
            f"{_pct(r['roofline_pct'])} ({_pct(r['dense_roofline_pct'])})")
        cfg = r.get("config", "") + (" (tuned)" if r.get("tuned") else "")
        lines.append(
            f"| {r['format']} | {r['m']} | {r['dense_ms']:.2f} | {r['qkern_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {'' if dq is None else f'{dq:.2f}x'} | "
            f"{r['weight_bytes'] / 1e6:.1f} ({r['dense_bytes'] / 1e6:.1f}) | "
            f"{r['gbps']:.1f} ({r['dense_gbps']:.1f}) | {roof} | {cfg} | "
            f"{r['rel_error']:.1e} | {r['quant_error']:.1e} |")
    return "\n".join(lines)


def plot(rows, path, *, title: str | None = None) -> None:
    """Speed-up over dense against M, one line per format, log-log; saved to `path`.

    Needs matplotlib (`pip install 'qkern[bench]'`); raises ImportError naming it otherwise.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'qkern[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    formats = list(dict.fromkeys(r["format"] for r in rows))
    ms = sorted({r["m"] for r in rows})
    for fmt in formats:
        pts = sorted((r["m"], r["speedup"]) for r in rows if r["format"] == fmt)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fmt)
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    speeds = [r["speedup"] for r in rows] + [1.0]
    lo, hi = min(speeds) / 1.15, max(speeds) * 1.15
    ticks = [t for t in (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 16) if lo <= t <= hi]
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("speed-up over dense (dense time / qkern time)")
    if rows:
        r0 = rows[0]
        ax.set_title(title or f"x[M, {r0['k']}] @ W[{r0['k']}, {r0['n']}] on {r0['device']}",
                     fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
