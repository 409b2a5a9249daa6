"""Decoding codes to float32, written with elementwise ops only (no gathers, no
interleaving), so the same functions run in plain jnp, in Triton kernels and in Mosaic
kernels.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..formats import Format


def split_nibbles(packed):
    """uint8 bytes -> (low, high) nibbles as int32."""
    b = packed.astype(jnp.int32)
    return b & 0xF, (b >> 4) & 0xF


def codebook_select(nib, codebook: np.ndarray):
    """16-entry lookup as a binary tree of selects on the nibble's bits (15 selects)."""
    vals = [jnp.float32(float(c)) for c in codebook]
    bit = 0
    while len(vals) > 1:
        sel = ((nib >> bit) & 1) == 1
        vals = [jnp.where(sel, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
        bit += 1
    return vals[0] + jnp.zeros(nib.shape, jnp.float32)


def e2m1_value(nib):
    """OCP FP4 E2M1 bits -> float32 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives)."""
    sign = jnp.where((nib & 8) != 0, -1.0, 1.0)
    e = (nib >> 1) & 3
    m = (nib & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * jnp.exp2((e - 1).astype(jnp.float32)))
    return sign * mag


def decode_nibbles(nib, fmt: Format):
    """4-bit codes (int32 0..15) -> unscaled float32 values."""
    if fmt.kind == "int":
        return (nib - 16 * (nib >= 8).astype(jnp.int32)).astype(jnp.float32)
    if fmt.kind == "codebook":
        return codebook_select(nib, fmt.codebook)
    if fmt.kind == "mx":
        return e2m1_value(nib)
    raise ValueError(f"{fmt.name} is not a 4-bit format")


def decode_unpacked(codes, fmt: Format):
    """One-code-per-element storage (int8 or float8) -> float32."""
    return codes.astype(jnp.float32)


def decode_codes(data, fmt: Format):
    """Whole stored `data` [Kd, N] -> [Kp, N] float32 (halves concatenated back)."""
    if fmt.packed:
        lo, hi = split_nibbles(data)
        return jnp.concatenate([decode_nibbles(lo, fmt), decode_nibbles(hi, fmt)], axis=0)
    return decode_unpacked(data, fmt)
