"""The number formats: what each stores and how its codes map to values."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from . import _codebooks


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format.

    kind: "int" (signed integer codes, `bits` wide), "codebook" (4-bit indices into
    `codebook`), "float" (codes are a narrow float dtype), "mx" (OCP microscaling: float
    elements and power-of-two e8m0 scales shared by blocks of 32).
    """

    name: str
    kind: str
    bits: int
    packed: bool                      # two 4-bit codes per byte along the block axis
    default_block: int | None         # None: one block spans the whole axis (per channel)
    codebook: np.ndarray | None = None
    float_dtype: object = None        # "float"/"mx" element dtype
    sign_magnitude: bool = False      # codebook: codes 8..15 are minus codes 0..7
    description: str = ""

    @property
    def qmax(self) -> int:
        """Largest integer code (int1: +1; its codes are -1 and +1, no zero)."""
        return 1 if self.bits == 1 else 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -1 if self.bits == 1 else -(2 ** (self.bits - 1))

    @property
    def binary(self) -> bool:
        """int1: a code is the sign of the scaled value, -1 or +1."""
        return self.kind == "int" and self.bits == 1

    @property
    def value_max(self) -> float:
        """Largest magnitude a code represents (before scaling)."""
        if self.kind == "int":
            return float(self.qmax)
        if self.kind == "codebook":
            return float(np.max(np.abs(self.codebook)))
        return float(jnp.finfo(self.float_dtype).max)

    @property
    def byte_floats(self) -> bool:
        """One float8 code per byte (fp8_e4m3, fp8_e5m2, mxfp8): stored as uint8 bit
        patterns, viewed as `float_dtype` to decode (see `float_codes`)."""
        return self.float_dtype is not None and not self.packed

    @property
    def supports_zero_points(self) -> bool:
        return self.kind == "int" and not self.binary


def _int(bits: int, block) -> Format:
    emulated = bits not in (4, 8)
    what = "signs: -1 or +1 times the scale" if bits == 1 else f"signed {bits}-bit integers"
    return Format(
        f"int{bits}", "int", bits, packed=(bits == 4), default_block=block,
        description=what + (" (emulated: one byte per code)" if emulated else ""))


FORMATS: dict[str, Format] = {
    "int8": _int(8, None),
    "int4": _int(4, 128),
    **{f"int{b}": _int(b, 128) for b in (2, 3, 5, 6, 7)},
    "int1": _int(1, 128),
    "nf4": Format("nf4", "codebook", 4, True, 64, codebook=_codebooks.NF4,
                  description="NormalFloat4, bitsandbytes' codebook"),
    "fp4": Format("fp4", "codebook", 4, True, 64, codebook=_codebooks.FP4, sign_magnitude=True,
                  description="bitsandbytes' FP4 codebook"),
    "fp8_e4m3": Format("fp8_e4m3", "float", 8, False, None, float_dtype=jnp.float8_e4m3fn,
                       description="float8 E4M3 (finite, max 448)"),
    "fp8_e5m2": Format("fp8_e5m2", "float", 8, False, None, float_dtype=jnp.float8_e5m2,
                       description="float8 E5M2 (max 57344)"),
    "mxfp4": Format("mxfp4", "mx", 4, True, 32, float_dtype=jnp.float4_e2m1fn,
                    description="OCP MXFP4: E2M1 elements, e8m0 scale per 32"),
    "mxfp8": Format("mxfp8", "mx", 8, False, 32, float_dtype=jnp.float8_e4m3fn,
                    description="OCP MXFP8: E4M3 elements, e8m0 scale per 32"),
}


def get_format(fmt: str | Format) -> Format:
    if isinstance(fmt, Format):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown quantisation format {fmt!r}; choose one of {', '.join(FORMATS)}."
        ) from None
