"""Config search spaces of the quantised-matmul kernels, and their pruning.

`candidates(problem, op)` returns (configs to time, [(config, why pruned)]). Every
candidate is first put through the kernel's own planner (the code that runs at trace
time), so a config the kernel would reject is pruned with the kernel's message, and
configs that the planner turns into the same tiling are timed once:

* xla: block_k (the K-chunk of the scan), deduplicated by the chunk the scan really uses
  (`_chunk_rows` rounds to whole scale blocks that divide K).
* triton: block_m (prefill only; decode tiles are 16 rows), block_n, block_k, num_warps,
  num_stages and split_k (decode and transposed kernels). Pruned: what `_plan` rejects
  (non powers of two, K tiles straddling scale blocks), duplicates after `_plan` clamps
  blocks to the problem, tiles whose software pipeline needs more shared memory than the
  GPU has (`SMEM_BYTES`), and accumulators over 128 float32 registers per thread.
* mosaic_tpu: block_m (tiled), block_n, block_k. Pruned: what `plan_mosaic` rejects (the
  (8, 128) tiling rules, K tiles not covering whole scale blocks, over 48 MiB of VMEM),
  and duplicates of the same plan.

The space is capped at `max_configs`: the heuristic's config plus those nearest to it (in
log2 steps of each field), a local search around a known-good point. For M > DECODE_M every
backend also times `dequantize=True` (dequantise W to x's dtype, then XLA's dot), so a
problem where the kernel loses to the dense dot is served by the dot instead
(`space={"dequantize": (False,)}` leaves it out).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from .. import _compat
from ..pallas._config import DECODE_M, MatmulConfig, Problem, default_config

XLA_BLOCK_K = (64, 128, 256, 512, 1024, 2048)

TRITON_SPACE = dict(block_m=(32, 64, 128), block_n=(32, 64, 128, 256),
                    block_k=(32, 64, 128, 256, 512), num_warps=(4, 8), num_stages=(2, 3, 4),
                    split_k=(1, 2, 4, 8))
MOSAIC_SPACE = dict(block_m=(16, 32, 64, 128, 256), block_n=(128, 256, 512, 1024),
                    block_k=(256, 512, 1024, 2048, 4096))

# Shared memory per thread block (bytes) by GPU, for pruning Triton's pipelined tiles.
SMEM_BYTES = {"H100": 227 << 10, "H200": 227 << 10, "H800": 227 << 10, "GH200": 227 << 10,
              "A100": 163 << 10, "A800": 163 << 10, "L4": 99 << 10, "L40": 99 << 10,
              "4090": 99 << 10, "3090": 99 << 10, "A10": 99 << 10, "V100": 96 << 10,
              "T4": 64 << 10}
SMEM_DEFAULT = 99 << 10     # an unknown GPU (or planning from a CPU host): sm_86/89's limit
MAX_ACC_REGS = 128          # float32 accumulators per thread before Triton spills

DEFAULT_MAX_CONFIGS = {"xla": None, "triton": 48, "mosaic_tpu": 32}


def smem_limit(device_kind: str) -> tuple[int, str]:
    """(shared memory bytes per block, the GPU it is for) for a jax device_kind."""
    kind = device_kind.upper()
    for name, limit in SMEM_BYTES.items():
        if name in kind:
            return limit, name
    return SMEM_DEFAULT, "an unknown GPU"


def _compact(c: MatmulConfig) -> str:
    return ", ".join(f"{f.name}={getattr(c, f.name)}" for f in dataclasses.fields(c))


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


# --------------------------------------------------------------------------------------
# xla
# --------------------------------------------------------------------------------------


def _xla_chunk(op, block_k: int) -> int:
    """The K-chunk (stored rows) the xla scan really uses for a requested block_k."""
    from ..pallas._xla_qmatmul import _chunk_rows

    rows = op.data.shape[0]          # stored rows per stream (Kp, or Kp/2 for 4-bit)
    nb = op.num_blocks
    per_stream = 1 if nb == 1 else (nb // 2 if op.fmt.packed else nb)
    return _chunk_rows(rows, op.block_size, per_stream, block_k)


def _xla(problem: Problem, op, block_ks) -> tuple[list, list, MatmulConfig]:
    from ..pallas import _native

    default = default_config("xla", problem.m)
    anchor = MatmulConfig(block_k=_xla_chunk(op, default.block_k))
    if problem.kernel == "qmatmul" and _native.runs_for(problem.m, op):
        # The native CPU kernel runs at this M and reads no block field: nothing to choose.
        pruned = [(MatmulConfig(block_k=bk), "the native CPU kernel runs at this M "
                   "(qkern/pallas/_native); block_k is unused") for bk in block_ks]
        return [anchor], pruned, anchor
    chosen: dict[int, MatmulConfig] = {}
    pruned = []
    for bk in block_ks:
        chunk = _xla_chunk(op, bk)
        if chunk in chosen:
            pruned.append((MatmulConfig(block_k=bk),
                           f"the scan would use the same chunk of {chunk} rows"))
        else:
            chosen[chunk] = MatmulConfig(block_k=chunk)
    configs = list(chosen.values())
    if anchor not in configs:
        configs.append(anchor)
    return configs, pruned, anchor


# --------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------


def triton_smem_bytes(plan, x_itemsize: int, data_itemsize: int, transposed: bool) -> int:
    """Shared memory Triton's software pipeline holds for one program: num_stages copies
    of the activation and code tiles per loop step. Forward: x [bm, bk] (two slices for
    4-bit formats) and codes [bk, bn]; transposed: dy [bm, bn] and codes [bk, bn]."""
    if transposed:
        act = plan.bm * plan.bn * x_itemsize
    else:
        act = (2 if plan.packed else 1) * plan.bm * plan.bk * x_itemsize
    codes = plan.bk * plan.bn * data_itemsize
    scales = 2 * plan.bn * 4
    return plan.num_stages * (act + codes + scales)


def _triton(problem: Problem, op, space, device_kind) -> tuple[list, list, MatmulConfig | None]:
    import numpy as np

    from ..pallas._triton_qmatmul import _plan

    transposed = problem.kernel == "qmatmul_t"
    decode = problem.m <= DECODE_M
    limit, gpu = smem_limit(device_kind)
    x_size = np.dtype(problem.x_dtype).itemsize
    d_size = np.dtype(op.data.dtype).itemsize
    block_ms = (16,) if decode else space["block_m"]
    splits = space["split_k"] if (decode or transposed) else (1,)
    seen: dict[tuple, MatmulConfig] = {}
    configs, pruned = [], []
    for bm, bn, bk, warps, stages, split in itertools.product(
            block_ms, space["block_n"], space["block_k"], space["num_warps"],
            space["num_stages"], splits):
        cfg = MatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                           num_stages=stages, split_k=split)
        try:
            p = _plan(op, problem.m, cfg, transposed=transposed)
        except (ValueError, TypeError) as err:
            pruned.append((cfg, f"rejected by the kernel: {err}"))
            continue
        tiling = (p.bm, p.bn, p.bk, p.split, p.num_warps, p.num_stages)
        if tiling in seen:
            pruned.append((cfg, f"same tiling as ({_compact(seen[tiling])}) after clamping "
                                "to the problem"))
            continue
        smem = triton_smem_bytes(p, x_size, d_size, transposed)
        if smem > limit:
            pruned.append((cfg, f"needs ~{smem >> 10} KiB of shared memory "
                                f"(> {limit >> 10} KiB on {gpu})"))
            continue
        acc = p.bm * p.bn / (32 * p.num_warps)
        if acc > MAX_ACC_REGS:
            pruned.append((cfg, f"{acc:.0f} float32 accumulators per thread (> "
                                f"{MAX_ACC_REGS}): register spills"))
            continue
        seen[tiling] = cfg
        configs.append(cfg)
    return configs, pruned, default_config("triton", problem.m)


# --------------------------------------------------------------------------------------
# mosaic_tpu
# --------------------------------------------------------------------------------------


def _mosaic(problem: Problem, op, space) -> tuple[list, list, MatmulConfig | None]:
    from ..pallas._mosaic_qmatmul import plan_mosaic

    kernel = ("transposed" if problem.kernel == "qmatmul_t"
              else "decode" if problem.m <= DECODE_M else "tiled")
    block_ms = (16,) if problem.m <= DECODE_M else space["block_m"]
    seen: dict[tuple, MatmulConfig] = {}
    configs, pruned = [], []
    for bm, bn, bk in itertools.product(block_ms, space["block_n"], space["block_k"]):
        cfg = MatmulConfig(block_m=bm, block_n=bn, block_k=bk)
        try:
            p = plan_mosaic(op, problem.m, problem.x_dtype, cfg, kernel=kernel)
        except (ValueError, TypeError) as err:
            pruned.append((cfg, f"rejected by the kernel: {err}"))
            continue
        tiling = (p.bm, p.bn, p.td, p.nk)
        if tiling in seen:
            pruned.append((cfg, f"same tiling as ({_compact(seen[tiling])}) after clamping "
                                "to the problem"))
            continue
        seen[tiling] = cfg
        configs.append(cfg)
    return configs, pruned, default_config("mosaic_tpu", problem.m)


# --------------------------------------------------------------------------------------


def candidates(problem: Problem, op, *, space: dict | None = None,
               max_configs: int | None | str = "default",
               device_kind: str = "") -> tuple[list[MatmulConfig], list[tuple[MatmulConfig, str]]]:
    """(configs to time, [(config, why it was pruned)]) for `problem` on operand `op`.

    `space` overrides the per-field values (e.g. {"block_k": (128, 256)} for xla);
    `max_configs` caps the timed set (None: no cap; "default": DEFAULT_MAX_CONFIGS).
    """
    if max_configs == "default":
        max_configs = DEFAULT_MAX_CONFIGS.get(problem.backend)
    if problem.backend == "xla":
        block_ks = (space or {}).get("block_k", XLA_BLOCK_K)
        configs, pruned, anchor = _xla(problem, op, block_ks)
    elif problem.backend == "triton":
        configs, pruned, anchor = _triton(problem, op, {**TRITON_SPACE, **(space or {})},
                                          device_kind)
    elif problem.backend == "mosaic_tpu":
        configs, pruned, anchor = _mosaic(problem, op, {**MOSAIC_SPACE, **(space or {})})
    else:
        raise ValueError(f"unknown backend {problem.backend!r}; choose xla, triton or "
                         "mosaic_tpu.")
    configs = _cap(configs, anchor, max_configs, pruned)
    if problem.m > DECODE_M and (space or {}).get("dequantize", (False, True)) != (False,):
        # Dequantise-then-dot, the fallback that keeps large M from losing to the dense dot
        # (it reads no block field; those of a legal candidate keep every entry plannable).
        base = configs[0] if configs else (anchor or MatmulConfig())
        configs.append(dataclasses.replace(base, dequantize=True))
    return configs, pruned


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
    import functools

    import jax
    import jax.numpy as jnp

    from ..pallas.qmatmul import qmatmul

    if problem.backend == "xla":
        return None
    platform = "cuda" if problem.backend == "triton" else "tpu"
    cols = problem.n if problem.kernel == "qmatmul_t" else problem.k
    x = jax.ShapeDtypeStruct((problem.m, cols), jnp.dtype(problem.x_dtype))
    fn = functools.partial(qmatmul, backend=problem.backend, config=config, interpret=False,
                           transposed=problem.kernel == "qmatmul_t")
    try:
        _compat.export(fn, platform, x, op)
    except Exception as err:  # noqa: BLE001  (any lowering failure prunes the config)
        return f"does not lower for {platform}: {type(err).__name__}: " \
               f"{str(err).splitlines()[0][:160]}"
    return None
