"""Helpers every Mosaic TPU kernel family shares: the (8, 128) tiling rules for M and N
tiles, the VMEM budget and its compiler parameters, and the accumulate-over-K pattern."""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
VMEM_DEFAULT = 16 << 20     # the smallest default scoped-VMEM limit among TPU generations
VMEM_MAX = 48 << 20         # stay below v7x's 64 MiB per core


def round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def tile_m(m: int, block_m: int, rows: int, explicit: bool) -> int:
    """The M tile of a tiled kernel: block_m rounded up to `rows` (the sublane tile of the
    dtype), at most M rounded up likewise. An explicit block_m must be a multiple of 8."""
    if explicit and block_m % SUBLANES:
        raise ValueError(f"block_m={block_m} is not a multiple of {SUBLANES} (Mosaic "
                         "TPU's sublane tiling).")
    return min(round_up(block_m, rows), round_up(m, rows))


def tile_n(n: int, block_n: int, explicit: bool) -> int:
    """The N tile: all of N, or a multiple of 128 (an explicit block_n that is neither is
    refused; a heuristic one is rounded down)."""
    if block_n >= n:
        return n                                     # all of N: legal at any width
    if block_n % LANES:
        if explicit:
            raise ValueError(f"block_n={block_n} is not a multiple of {LANES} and is smaller "
                             f"than N={n}: Mosaic TPU needs N tiles that are multiples of 128 "
                             "or all of N.")
        return max(LANES, block_n // LANES * LANES)
    return block_n


def check_k_tile(t: int, rows: int, block_size: int, num_blocks: int, what: str) -> int:
    """Check a K tile of `t` stored rows (of `rows` in all, `what` naming the weight) against
    Mosaic's rules: a multiple of 128 lanes and, with per-block scales, whole blocks making
    a multiple of 8 scale rows. Returns the scale rows per tile (1 per channel)."""
    if t % LANES:
        raise ValueError(
            f"block_k={t} is not a multiple of {LANES}: Mosaic TPU needs the x tile's K "
            f"width to be a multiple of 128 (or block_k >= {rows}, the whole K).")
    if num_blocks == 1:
        return 1
    b = block_size
    if t % b:
        raise ValueError(
            f"block_k={t} is not a multiple of the block size {b} of this {what}: a K tile "
            f"must cover whole scale blocks (or use block_k >= {rows}).")
    r = t // b
    if r % SUBLANES:
        raise ValueError(
            f"block_k={t} gives {r} scale rows per K tile (block size {b}); Mosaic TPU "
            f"needs a multiple of 8 (block_k a multiple of {SUBLANES * b}) or the whole K "
            f"in one tile (block_k >= {rows}).")
    return r


def compiler_params(vmem_bytes: int, semantics) -> pltpu.CompilerParams:
    """Dimension semantics, and a scoped-VMEM limit raised (within VMEM_MAX) for plans that
    need more than most of the default."""
    limit = None
    if vmem_bytes > VMEM_DEFAULT * 3 // 4:
        limit = min(VMEM_MAX, round_up(vmem_bytes * 3 // 2, 1 << 20))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def accumulate(acc_ref, part, step, last, write=None):
    """acc = part at step 0, acc += part after; at the last step write(acc) (if given)."""
    @pl.when(step == 0)
    def _():
        acc_ref[...] = part

    @pl.when(step > 0)
    def _():
        acc_ref[...] += part

    if write is not None:
        @pl.when(step == last)
        def _():
            write(acc_ref[...])
