"""Helpers every Triton kernel family shares: power-of-two tiling arithmetic, masked loads,
compiler parameters, and the GPU limits the config search prunes by."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from ._config import MatmulConfig

MIN_DOT = 16             # smallest M, N and K of a dot that Triton's MMA accepts

# Shared memory per thread block (bytes) by GPU, for pruning Triton's pipelined tiles.
SMEM_BYTES = {"H100": 227 << 10, "H200": 227 << 10, "H800": 227 << 10, "GH200": 227 << 10,
              "A100": 163 << 10, "A800": 163 << 10, "L4": 99 << 10, "L40": 99 << 10,
              "4090": 99 << 10, "3090": 99 << 10, "A10": 99 << 10, "V100": 96 << 10,
              "T4": 64 << 10}
SMEM_DEFAULT = 99 << 10     # an unknown GPU (or planning from a CPU host): sm_86/89's limit
MAX_ACC_REGS = 128          # float32 accumulators per thread before Triton spills


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The launch geometry every Triton plan has (each family's plan adds its own fields)."""
    bm: int
    bn: int
    bk: int               # stored rows per step of the contraction loop
    sub: int              # rows per scale block step inside a K tile (bk or B)
    steps: int            # loop trips per program
    split: int            # programs along the loop axis, their partials summed outside
    num_warps: int
    num_stages: int

    @property
    def subs(self) -> int:
        return self.bk // self.sub


def split_work(total: int, split: int) -> tuple[int, int]:
    """(steps per program, programs) for `total` loop steps over at most `split` programs,
    none of them left without work."""
    split = max(1, min(split, total))
    steps = -(-total // split)
    return steps, -(-total // steps)


def pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def largest_pow2_divisor(v: int) -> int:
    return v & -v


def checked_blocks(config, block_size: int, num_blocks: int, what: str,
                   default) -> tuple:
    """(config, explicit, bm, bn, bk) of a Triton plan: `config`, or the heuristic `default`
    when None. An explicit block_k must be a multiple or a divisor of the weight's block
    size (a K tile never straddles a scale block; the heuristic's is moved to the largest
    power of two dividing it), and every block a power of two."""
    explicit = config is not None
    cfg = config if explicit else default
    if not isinstance(cfg, MatmulConfig):
        raise TypeError(f"config must be a MatmulConfig, got {type(cfg).__name__}.")
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if num_blocks > 1 and bk % block_size and block_size % bk:
        if explicit:
            raise ValueError(
                f"block_k={bk} is incompatible with the {what}'s block_size {block_size}: a "
                f"K tile must not straddle a scale block, so block_k must be a multiple or a "
                f"divisor of {block_size}.")
        bk = largest_pow2_divisor(block_size)
    for name, v in (("block_k", bk), ("block_n", bn), ("block_m", bm)):
        if not pow2(v):
            raise ValueError(f"{name}={v} must be a power of two (Triton tensor sizes).")
    return cfg, explicit, bm, bn, bk


def tile_mask(rows, row_limit: int, cols, col_limit: int):
    """The [len(rows), len(cols)] load mask of rows < row_limit and cols < col_limit, or
    None when neither limit cuts the tile (rows / cols None: that side is whole)."""
    mask = None
    if rows is not None:
        mask = (rows < row_limit)[:, None]
    if cols is not None:
        c = (cols < col_limit)[None, :]
        mask = c if mask is None else mask & c
    return mask


def masked_load(view, mask, dtype):
    """Load `view`; where `mask` is False read 0 (no mask: a plain load)."""
    if mask is None:
        return view[...]
    return plgpu.load(view, mask=mask, other=jnp.zeros((), dtype))


def compiler_params(p):
    """Triton compiler parameters of a plan with num_warps and num_stages."""
    return plgpu.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)


def smem_limit(device_kind: str) -> tuple[int, str]:
    """(shared memory bytes per block, the GPU it is for) for a jax device_kind."""
    kind = device_kind.upper()
    for name, limit in SMEM_BYTES.items():
        if name in kind:
            return limit, name
    return SMEM_DEFAULT, "an unknown GPU"


def register_pressure(bm: int, bn: int, num_warps: int) -> str | None:
    """Why a [bm, bn] float32 accumulator would spill registers, or None."""
    acc = bm * bn / (32 * num_warps)
    if acc > MAX_ACC_REGS:
        return f"{acc:.0f} float32 accumulators per thread (> {MAX_ACC_REGS}): register spills"
    return None
