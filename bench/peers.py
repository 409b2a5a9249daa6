"""qkern against the CPU kernels a user could pick instead: PyTorch's weight-only int8 and
int4 matmuls, and both libraries' dense float32 matmul, in turns in one process.

    pip install torch==2.13.0            # the CPU wheel; torch is not a qkern dependency
    python bench/peers.py                # x[M, 4096] @ W[4096, 4096], M = 1 and 16
    python bench/peers.py --m 1,16,64 --repeats 30
    python bench/peers.py --isa all      # qkern's native kernels in each variant the CPU runs

PyTorch's kernels take bfloat16 activations (`torch.ops.aten._weight_int8pack_mm`, per
channel int8; `torch.ops.aten._weight_int4pack_mm_for_cpu`, int4 in groups of 128 with a
scale and zero point per group); qkern's take float32 ones. Every entry is checked against
its own dequantised weight before timing. The table gives each median and its speed-up
over XLA's dense float32 matmul, and the ratios the project tracks: qkern int8 against
PyTorch int8, qkern int4 and nf4 against PyTorch int4 (above 1: qkern is faster). The
machine's CPU model and its vector flags are printed with it.

PyTorch's OpenMP threads spin for a while after each call; in turns on a 2-core machine
that spinning ate whichever call came next (qkern's native kernels ran at half speed).
OMP_WAIT_POLICY=PASSIVE (set here unless already set) makes them sleep instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import qkern

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
         "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> str:
    """The CPU model and which of FLAGS it has (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{model}; flags: {' '.join(f for f in FLAGS if f in flags) or 'unknown'}"


def _ready(out):
    if isinstance(out, jax.Array):
        out.block_until_ready()
    return out


def medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each callable, called in turns (a, b, c, a, b, c, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            _ready(fn())
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def torch_entries(torch, w: np.ndarray, x: np.ndarray, group: int = 128) -> dict:
    """{name: (call, result as float32 numpy, reference)} for PyTorch's kernels."""
    k, n = w.shape
    wt = torch.from_numpy(np.ascontiguousarray(w.T))              # [N, K], PyTorch's layout
    xf = torch.from_numpy(np.array(x))            # a writable copy
    xb = xf.to(torch.bfloat16)
    w_kn = torch.from_numpy(np.array(w))
    out = {"torch dense float32": (lambda: torch.mm(xf, w_kn), xf @ w_kn)}
    # int8, per output channel
    s8 = wt.abs().amax(dim=1) / 127
    q8 = torch.clamp(torch.round(wt / s8[:, None]), -127, 127).to(torch.int8)
    s8b = s8.to(torch.bfloat16)
    ref8 = xb.float() @ (q8.float() * s8b.float()[:, None]).T
    out["torch int8 weight-only (bf16 x)"] = (
        lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8b), ref8)
    # int4, groups of `group` along K, asymmetric: w = (q - 8) * scale + zero
    wg = wt.reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    zero = lo + 8 * scale
    q4 = torch.clamp(torch.round((wg - lo[..., None]) / scale[..., None]), 0, 15)
    q4 = q4.to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()
    sb, zb = scale.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float()
    deq4 = ((q4.reshape(n, k // group, group).float() - 8) * sb[..., None] + zb[..., None])
    ref4 = xb.float() @ deq4.reshape(n, k).T
    out[f"torch int4 g{group} (bf16 x)"] = (
        lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, sz), ref4)
    return out


def _qkern_call(xj, q, isa: str):
    """`xj @ q` through qkern, compiled now with the native kernels capped at `isa` (read
    when the function is traced; "" leaves the choice to qkern)."""
    old = os.environ.get("QKERN_NATIVE_ISA")
    if isa:
        os.environ["QKERN_NATIVE_ISA"] = isa
    try:
        compiled = jax.jit(qkern.quaxify(lambda x, w: x @ w)).lower(xj, q).compile()
    finally:
        if isa:
            if old is None:
                del os.environ["QKERN_NATIVE_ISA"]
            else:
                os.environ["QKERN_NATIVE_ISA"] = old
    return lambda: compiled(xj, q)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,16", help="comma-separated rows of x (default: 1,16)")
    p.add_argument("--k", type=int, default=4096, help="K (default: 4096)")
    p.add_argument("--n", type=int, default=4096, help="N (default: 4096)")
    p.add_argument("--formats", default="int8,int4,nf4,fp8_e4m3",
                   help="qkern formats (default: int8,int4,nf4,fp8_e4m3)")
    p.add_argument("--repeats", type=int, default=20, help="timed turns (default: 20)")
    p.add_argument("--isa", default="", help="qkern's native-kernel variants to time side by "
                   "side (comma-separated, or all: every one this CPU runs); default: the one "
                   "qkern picks")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts OpenMP
    try:
        import torch
    except ImportError:
        raise SystemExit("bench/peers.py needs PyTorch: pip install torch==2.13.0 (CPU wheel)")
    formats = a.formats.split(",")
    w = np.array(jax.random.normal(jax.random.PRNGKey(0), (a.k, a.n), jnp.float32))
    qs = {f: qkern.quantize(jnp.asarray(w), f) for f in formats}
    dense = jax.jit(lambda x, w: x @ w)
    isas = [""]
    if a.isa:
        from qkern.pallas.qmatmul._native import _build
        isas = _build.runnable_variants() if a.isa == "all" else a.isa.split(",")
    wj = jnp.asarray(w)
    print(f"x[M, {a.k}] @ W[{a.k}, {a.n}], medians of {a.repeats} turns; {cpu()}; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
    for m in [int(s) for s in a.m.split(",")]:
        x = np.asarray(jax.random.normal(jax.random.PRNGKey(m), (m, a.k), jnp.float32))
        xj = jnp.asarray(x)
        entries = {"XLA dense float32": (lambda: dense(xj, wj), x @ w)}
        entries.update(torch_entries(torch, w, x))
        for isa in isas:
            for f, q in qs.items():
                name = f"qkern {f}" + (f" [{isa}]" if isa else "")
                entries[name] = (_qkern_call(xj, q, isa),
                                 x @ np.asarray(qkern.dequantize(q), np.float32))
        for name, (fn, ref) in entries.items():      # each against its own dequantised weight
            out = _ready(fn())
            got = out.float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            got = got.astype(np.float32)
            ref = (ref.float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref))
            ref = ref.astype(np.float32)
            err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            if err > 2e-2:
                raise SystemExit(f"{name} at M={m}: relative error {err:.3g} against its own "
                                 "dequantised weight")
        t = medians({name: fn for name, (fn, _) in entries.items()}, a.repeats)
        base = t["XLA dense float32"]
        print(f"\nM = {m}\n| kernel | ms | vs XLA dense float32 |\n|---|---|---|")
        for name, s in t.items():
            print(f"| {name} | {s * 1e3:.3f} | {base / s:.2f}x |")
        ratios = []
        for isa in isas:
            sfx = f" [{isa}]" if isa else ""
            if f"qkern int8{sfx}" in t:
                ratios.append((f"qkern int8{sfx} vs torch int8",
                               t["torch int8 weight-only (bf16 x)"] / t[f"qkern int8{sfx}"]))
            for f in ("int4", "nf4"):
                if f"qkern {f}{sfx}" in t:
                    ratios.append((f"qkern {f}{sfx} vs torch int4",
                                   t["torch int4 g128 (bf16 x)"] / t[f"qkern {f}{sfx}"]))
        print("  " + "; ".join(f"{k}: {v:.2f}x" for k, v in ratios))


if __name__ == "__main__":
    main()
