"""Decoding codes to float32, written with elementwise ops only (no gathers, no
interleaving), so the same functions run in plain jnp, in Triton kernels and in Mosaic
kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..formats import Format
from ..formats._quantize import float_codes


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


def fp8_from_bits(bits, float_dtype):
    """float8 bit patterns (int32 0..255) -> float32, exactly as `.astype(jnp.float32)`:
    every one of the 256 codes, NaN, inf, -0 and subnormals included.

    For kernels that cannot convert float8 natively (Mosaic TPU; Triton on GPUs below
    sm_89): the exponent and mantissa bits of normal numbers are moved into float32's fields
    and the bias corrected with an integer add; subnormals are mantissa * 2^(1-bias-m) (TPUs
    flush float32 subnormals, so no float32-subnormal trick is used). Integer and
    elementwise operations only, so it lowers for Triton and Mosaic alike. The one fp8
    decoder of every backend.
    """
    dt = jnp.dtype(float_dtype)
    if dt == jnp.dtype(jnp.float8_e4m3fn):
        mbits, bias = 3, 7
    elif dt == jnp.dtype(jnp.float8_e5m2):
        mbits, bias = 2, 15
    else:
        raise ValueError(f"no float8 bit decoder for {dt.name}; supported: float8_e4m3fn, "
                         "float8_e5m2.")
    mag = bits & 0x7F
    e = mag >> mbits
    m = mag & ((1 << mbits) - 1)
    normal = jax.lax.bitcast_convert_type((mag << (23 - mbits)) + ((127 - bias) << 23),
                                          jnp.float32)
    sub = m.astype(jnp.float32) * np.float32(2.0 ** (1 - bias - mbits))
    v = jnp.where(e == 0, sub, normal)
    if dt == jnp.dtype(jnp.float8_e4m3fn):
        v = jnp.where(mag == 0x7F, np.float32(np.nan), v)            # e4m3fn: only NaN
    else:
        emax = (1 << 5) - 1
        v = jnp.where(e == emax, jnp.where(m == 0, np.float32(np.inf), np.float32(np.nan)), v)
    return jnp.where((bits & 0x80) != 0, -v, v)


def nibble_table(fmt) -> np.ndarray:
    """The 16 float32 values a 4-bit code stands for (codebook formats, FP4 E2M1)."""
    if fmt.kind == "codebook":
        return np.asarray(fmt.codebook, np.float32)
    # mx: the element dtype's 16 bit patterns (ml_dtypes keeps a 4-bit float in a byte)
    return np.arange(16, dtype=np.uint8).view(np.dtype(fmt.float_dtype)).astype(np.float32)


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
    """One-code-per-element storage (int8, or float8 bit patterns as uint8) -> float32."""
    return float_codes(codes, fmt).astype(jnp.float32)


def decode_codes(data, fmt: Format):
    """Whole stored `data` [Kd, N] -> [Kp, N] float32 (halves concatenated back)."""
    if fmt.packed:
        lo, hi = split_nibbles(data)
        return jnp.concatenate([decode_nibbles(lo, fmt), decode_nibbles(hi, fmt)], axis=0)
    return decode_unpacked(data, fmt)
