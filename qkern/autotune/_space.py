"""Config search spaces of the kernels, from the backend table, and their pruning.

`candidates(problem, op)` returns (configs to time, [(config, why pruned)]). The space is
the backend's own: each backend module of a family (qkern/pallas/<family>/_xla.py,
_triton.py, _mosaic.py) declares `SPACE`, `MAX_CONFIGS` and `candidates`, which puts every
config through the kernel's own planner (the code that runs at trace time), so a config
the kernel would reject is pruned with the kernel's message, and configs the planner turns
into the same tiling are timed once:

* xla: block_k (the K-chunk of the scan, or of W8A8's int8 product), deduplicated by the
  chunk really used.
* triton: block_m (prefill only; decode tiles are 16 rows), block_n, block_k, num_warps,
  num_stages and split_k (decode and transposed kernels). Pruned: what the planner rejects,
  duplicates after clamping, tiles whose software pipeline needs more shared memory than
  the GPU has (`pallas/_triton_common.SMEM_BYTES`), and accumulators over 128 float32
  registers per thread.
* mosaic_tpu: block_m (tiled), block_n, block_k. Pruned: what the planner rejects (the
  (8, 128) tiling rules, K tiles not covering whole scale blocks, the VMEM budget), and
  duplicates of the same plan.

Here, for every family: the cap at `max_configs` (the heuristic's config plus those
nearest to it, in log2 steps of each field: a local search around a known-good point),
and for M > DECODE_M on the weight-only kernels `dequantize=True` (dequantise W to x's
dtype, then XLA's dot), so a problem where the kernel loses to the dense dot is served by
the dot instead (`space={"dequantize": (False,)}` leaves it out).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .. import _compat
from ..pallas import _backend
from ..pallas._config import DECODE_M, KERNELS, MatmulConfig, Problem, heuristic_config
from ..pallas.lora_qmatmul import lora_qmatmul
from ..pallas.qmatmul import qmatmul
from ..pallas.w8a8 import w8a8_matmul

# Kernels whose problems can be served by dequantise-then-dot (config.dequantize).
_DEQUANTIZABLE = ("qmatmul", "qmatmul_t")


def module(problem: Problem):
    """The backend module that runs `problem` (from the backend table)."""
    if problem.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {problem.kernel!r}; choose from {', '.join(KERNELS)}.")
    impls = _backend.implementations(problem.family)
    if problem.backend not in impls:
        raise ValueError(f"unknown backend {problem.backend!r} for {problem.family}; choose "
                         f"from {', '.join(impls)}.")
    return impls[problem.backend]


def _distance(a: MatmulConfig, b: MatmulConfig) -> float:
    return sum(abs(math.log2(getattr(a, f.name) / getattr(b, f.name)))
               for f in dataclasses.fields(MatmulConfig) if f.name != "dequantize")


def _cap(configs: list[MatmulConfig], anchor: MatmulConfig | None, max_configs: int | None,
         pruned: list) -> list[MatmulConfig]:
    if max_configs is None or len(configs) <= max_configs:
        return configs
    anchor = anchor or configs[0]
    keep = sorted(configs, key=lambda c: (_distance(c, anchor), repr(c)))[:max_configs]
    kept = set(keep)
    for c in configs:
        if c not in kept:
            pruned.append((c, f"beyond the {max_configs} configs nearest the heuristic"))
    return [c for c in configs if c in kept]


def candidates(problem: Problem, op, *, space: dict | None = None,
               max_configs: int | None | str = "default",
               device_kind: str = "") -> tuple[list[MatmulConfig], list[tuple[MatmulConfig, str]]]:
    """(configs to time, [(config, why it was pruned)]) for `problem` on operand `op`.

    `space` overrides the per-field values of the backend's SPACE (e.g. {"block_k":
    (128, 256)} for xla); `max_configs` caps the timed set (None: no cap; "default": the
    backend's MAX_CONFIGS).
    """
    mod = module(problem)
    if max_configs == "default":
        max_configs = mod.MAX_CONFIGS
    fields = {k: v for k, v in (space or {}).items() if k != "dequantize"}
    configs, pruned, anchor = mod.candidates(problem, op, {**mod.SPACE, **fields}, device_kind)
    configs = _cap(configs, anchor, max_configs, pruned)
    if (problem.kernel in _DEQUANTIZABLE and problem.m > DECODE_M
            and (space or {}).get("dequantize", (False, True)) != (False,)):
        # Dequantise-then-dot, the fallback that keeps large M from losing to the dense dot
        # (it reads no block field; those of a legal candidate keep every entry plannable).
        base = configs[0] if configs else (anchor or MatmulConfig())
        configs.append(dataclasses.replace(base, dequantize=True))
    return configs, pruned


def shipped_default(problem: Problem, op) -> MatmulConfig | None:
    """What the kernel runs without a tuned config: on xla the heuristic (as the kernel
    really runs it, so it matches its candidate); on a Pallas backend None, the kernel's
    own choice."""
    if problem.backend != "xla":
        return None
    mod = module(problem)
    anchor = mod.candidates(problem, op, mod.SPACE, "")[2]
    if heuristic_config(problem).dequantize:      # small weights at prefill sizes
        return dataclasses.replace(anchor, dequantize=True)
    return anchor


# --------------------------------------------------------------------------------------
# Running one problem
# --------------------------------------------------------------------------------------


def inputs(problem: Problem, op) -> tuple:
    """Example inputs of the problem's shapes and dtype (besides op): (x,) or (x, u, v)."""
    cols = problem.n if problem.kernel.endswith("_t") else problem.k
    x = jax.random.normal(jax.random.PRNGKey(1), (problem.m, cols), jnp.float32)
    x = x.astype(problem.x_dtype)
    if problem.family != "lora_qmatmul":
        return (x,)
    out = problem.k if problem.kernel.endswith("_t") else problem.n
    r = max(problem.rank, 1)
    u = jax.random.normal(jax.random.PRNGKey(2), (cols, r), jnp.float32) / math.sqrt(cols)
    v = jax.random.normal(jax.random.PRNGKey(3), (r, out), jnp.float32) / math.sqrt(r)
    return (x, u, v)


def function(problem: Problem, config: MatmulConfig | None, *, interpret: bool = False):
    """f(op, *inputs) running the problem's kernel with `config` on its backend."""
    kw = dict(backend=problem.backend, config=config, interpret=interpret)
    is_t = problem.kernel.endswith("_t")
    if problem.family == "qmatmul":
        return lambda op, x: qmatmul(x, op, transposed=is_t, **kw)
    if problem.family == "w8a8":
        return lambda op, x: w8a8_matmul(x, op, **kw)
    return lambda op, x, u, v: lora_qmatmul(x, op, u, v, 1.0, transposed=is_t, **kw)


# --------------------------------------------------------------------------------------
# lowering (from any host)
# --------------------------------------------------------------------------------------


def lowering_error(problem: Problem, op, config: MatmulConfig) -> str | None:
    """Why `config` does not lower for the problem's real target, or None when it does.

    Runs the Pallas-to-Triton (`cuda`) or Pallas-to-Mosaic (`tpu`) lowering through
    `jax.export` on this host, no GPU or TPU needed. Lowering is necessary, not
    sufficient: Triton's and Mosaic's own compilers run only on the device, where a
    config that fails to compile is recorded as failed when it is timed.
    """
    if problem.backend == "xla":
        return None
    platform = "cuda" if problem.backend == "triton" else "tpu"
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs(problem, op)]
    fn = function(problem, config)
    try:
        _compat.export(fn, platform, op, *args)
    except Exception as err:  # noqa: BLE001  (any lowering failure prunes the config)
        return f"does not lower for {platform}: {type(err).__name__}: " \
               f"{str(err).splitlines()[0][:160]}"
    return None
