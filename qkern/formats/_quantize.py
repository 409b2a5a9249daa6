"""Quantise and dequantise arrays, block by block along one axis.

Layout (the "stored" layout; QArray adds a metadata-only transpose on top):
- `axis`: the block axis. Blocks of `block_size` run along it; the axis is zero-padded to
  a whole number of blocks (`npad`), and 4-bit formats pack two codes per byte along it
  (see _packing.py), so `data` has length npad/2 there.
- `scales` (and `zeros`) have the stored shape with the block axis replaced by the number
  of blocks; per tensor, they are all-ones in shape.
- Everything is computed in float32 and cast to the logical dtype at the end.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._compat import Tracer, explicit_sharding
from ._packing import pack_halves, unpack_halves
from ._spec import Format, get_format

DQ_BLOCK = 256  # double quantisation: scales quantised to int8 in blocks of 256, as QLoRA
DQ_NAN_CODE = -128  # a double-quantised scale that is NaN (codes are otherwise -127..127)
MX_NAN_SCALE = 255  # OCP MX E8M0 scale code for NaN (exponents are otherwise 0..254)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How a block's scale (and zero point) is chosen.

    method: "absmax" (largest magnitude maps to the largest code), "minmax" (the block's
    [min, max] maps onto the integer range, with a zero point; integer formats only),
    "rms" (clip at `factor` x the block's RMS), "fixed" (the range [lo, hi] for every block).
    """

    method: str = "absmax"
    factor: float = 3.0
    lo: float | None = None
    hi: float | None = None


def parse_calibration(calibration: Any) -> Calibration:
    """"absmax" | "minmax" | "rms" | ("rms", factor) | ("fixed", bound) | ("fixed", lo, hi)."""
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, str):
        if calibration in ("absmax", "minmax", "rms"):
            return Calibration(calibration)
    elif isinstance(calibration, tuple) and calibration:
        method, *args = calibration
        nums = [_finite_number(a) for a in args]
        if None not in nums:
            if method == "rms" and len(nums) == 1 and nums[0] > 0:
                return Calibration("rms", factor=nums[0])
            if method == "fixed" and len(nums) == 1 and nums[0] > 0:
                return Calibration("fixed", lo=-nums[0], hi=nums[0])
            if method == "fixed" and len(nums) == 2 and nums[0] < nums[1]:
                return Calibration("fixed", lo=nums[0], hi=nums[1])
    raise ValueError(
        f"Unknown calibration {calibration!r}: use 'absmax', 'minmax', 'rms', ('rms', factor), "
        "('fixed', bound) or ('fixed', lo, hi) with lo < hi; factors and bounds are finite "
        "Python numbers (a factor or bound > 0)."
    )


def _finite_number(v) -> float | None:
    """`v` as a float when it is a finite real number (a bool, a string or a non-scalar is
    not), else None."""
    if isinstance(v, (bool, np.bool_, str, bytes)) or np.ndim(v) != 0:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_axis(axis) -> None:
    """`axis` must be an int (or None, per tensor): 1.0 or "0" would otherwise fail deep inside."""
    if axis is not None and not _is_int(axis):
        raise TypeError(f"axis must be an int (the block axis) or None (per tensor), got {axis!r}.")


def check_options(fmt, *, block_size=None, axis=-2, calibration="absmax", scale_dtype=None,
                  double_quant=False) -> None:
    """The checks of `qkern.quantize`'s options that need no array (types, ranges, and
    which formats take which block sizes and calibrations): run by `quantize` and when a
    `qkern.Rule` is written, with the same messages. fmt None: the type checks only."""
    if block_size is not None:
        if not _is_int(block_size):
            raise TypeError(f"block_size must be an int or None, got {block_size!r}.")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}.")
    check_axis(axis)
    if scale_dtype is not None:
        try:
            floating = jnp.issubdtype(scale_dtype, jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise TypeError(f"scale_dtype must be a floating dtype (e.g. jnp.bfloat16), "
                            f"got {scale_dtype!r}.")
    if fmt is None:
        return
    f = get_format(fmt)                   # unknown formats
    check_scale_dtype(f, scale_dtype)
    check_blocks(f, block_size, per_tensor=axis is None)
    check_calibration(f, calibration, double_quant)


def check_scale_dtype(fmt: Format, scale_dtype) -> None:
    if fmt.kind == "mx" and scale_dtype is not None:
        raise ValueError(f"{fmt.name} stores its scales as 8-bit powers of two (E8M0, OCP MX); "
                         f"scale_dtype={jnp.dtype(scale_dtype).name} does not apply.")


def check_blocks(fmt: Format, block_size, per_tensor: bool) -> None:
    """The block sizes a format takes (MX: 32 only; 4-bit: even)."""
    if fmt.kind == "mx":
        if block_size not in (None, 32):
            raise ValueError(f"{fmt.name} uses blocks of 32 (OCP MX); got block_size={block_size}.")
        if per_tensor:
            raise ValueError(f"{fmt.name} scales blocks of 32; per-tensor (axis=None) does not apply.")
    elif per_tensor and block_size is not None:
        raise ValueError(
            f"block_size={block_size} with axis=None: per tensor is one scale for the whole "
            "array, so there are no blocks. Drop block_size, or give the axis the blocks run "
            "along (e.g. axis=-2).")
    elif fmt.packed and not per_tensor and block_size is not None and block_size % 2:
        raise ValueError(
            f"{fmt.name} packs two codes per byte along the block axis, so block_size must "
            f"be even; got {block_size}.")


def check_calibration(fmt: Format, calibration, double_quant: bool) -> Calibration:
    """The calibrations (and double quantisation) a format takes; the parsed calibration."""
    cal = parse_calibration(calibration)
    if cal.method == "minmax" and not fmt.supports_zero_points:
        raise ValueError(f"calibration='minmax' (zero points) applies to integer formats of 2 "
                         f"bits or more, not {fmt.name}.")
    if fmt.kind == "mx" and cal.method != "absmax":
        raise ValueError(f"{fmt.name} scales are powers of two from each block's absmax; "
                         f"calibration={calibration!r} does not apply.")
    if double_quant and (fmt.kind == "mx" or cal.method == "minmax"):
        raise ValueError("double_quant applies to formats with float scales and symmetric "
                         f"calibration, not {fmt.name} with {cal.method}.")
    return cal


@dataclasses.dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]   # the stored (unpadded) shape
    axis: int                # block (and packing) axis, non-negative
    block_size: int
    per_tensor: bool
    # 4-bit formats pack by halves; an even number of blocks keeps both halves aligned to
    # block boundaries (so a kernel tile never straddles two scales).
    even_blocks: bool = False

    @property
    def length(self) -> int:
        return self.shape[self.axis]

    @property
    def num_blocks(self) -> int:
        nb = -(-self.length // self.block_size)
        return nb + (nb % 2) if self.even_blocks and nb > 1 else nb

    @property
    def padded(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def scale_shape(self) -> tuple[int, ...]:
        if self.per_tensor:
            return (1,) * len(self.shape)
        s = list(self.shape)
        s[self.axis] = self.num_blocks
        return tuple(s)


def make_layout(shape, fmt: Format, block_size, axis, *, default_axis: bool) -> Layout:
    shape = tuple(int(d) for d in shape)
    check_options(None, block_size=block_size, axis=axis)
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("qkern.quantize needs an array of rank >= 1, got a scalar.")
    per_tensor = axis is None
    if per_tensor or default_axis:
        axis = ndim - 2 if ndim >= 2 else 0
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of shape {shape}.")
    axis %= ndim
    n = shape[axis]
    if n == 0:
        raise ValueError(f"cannot quantise an empty axis: shape {shape}, axis {axis}.")
    even = lambda b: b + (b % 2) if fmt.packed else b
    check_blocks(fmt, block_size, per_tensor)
    if fmt.kind == "mx":
        block = 32
    elif per_tensor:
        block = even(n)
    elif block_size is None:
        block = even(n) if fmt.default_block is None else min(fmt.default_block, even(n))
    else:
        block = int(block_size)
        if block > even(n):
            raise ValueError(
                f"block_size {block} is larger than axis {axis} of shape {shape} (length {n}); "
                "use a smaller block_size, or block_size=None for one block per channel.")
    return Layout(shape, axis, block, per_tensor, even_blocks=fmt.packed)


def _blocked(x: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    """[..., npad, ...] -> [..., num_blocks, block_size, ...]."""
    a = layout.axis
    return x.reshape(x.shape[:a] + (layout.num_blocks, layout.block_size) + x.shape[a + 1:])


def _reduce_axes(layout: Layout, ndim_blocked: int) -> tuple[int, ...]:
    if layout.per_tensor:
        return tuple(range(ndim_blocked))
    return (layout.axis + 1,)


def _to_scale_shape(x: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    return x.reshape(layout.scale_shape)


def _expand_scale(s: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    """Scale-shaped array -> broadcastable against the blocked array."""
    return jnp.expand_dims(s, layout.axis + 1)


def quantize_array(w: jax.Array, fmt: str | Format, *, block_size=None, axis: int | None = -2,
                   default_axis: bool = False, calibration: Any = "absmax",
                   scale_dtype=None, double_quant: bool = False) -> dict:
    """Quantise `w`; returns the QArray fields (data, scales, zeros, dq_scale, dq_offset)
    and the static layout."""
    fmt = get_format(fmt)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"qkern.quantize expects a floating-point array, got dtype {w.dtype}.")
    layout = make_layout(w.shape, fmt, block_size, axis, default_axis=default_axis)
    cal = check_calibration(fmt, calibration, double_quant)
    check_scale_dtype(fmt, scale_dtype)

    x = w.astype(jnp.float32)
    pad = layout.padded - layout.length
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[layout.axis] = (0, pad)
        x = jnp.pad(x, widths)
    xb = _blocked(x, layout)
    red = _reduce_axes(layout, xb.ndim)
    # Non-finite weights (NaN/inf) never become finite codes: the block holding one gets a
    # NaN scale (MX: the E8M0 NaN code 0xFF), so it dequantises to NaN, and a matmul's
    # outputs that read it are NaN, as the dense product's would be non-finite. (Found by
    # its own reduction: XLA's CPU max/min may drop NaN, so the scale's statistic cannot
    # tell.) `nonfinite_blocks` lets eager callers refuse such weights outright
    # (`refuse_nonfinite`; see docs/formats.md).
    bad = jnp.any(~jnp.isfinite(xb), axis=red, keepdims=True)
    zeros = None
    # Zero points: minmax, or an asymmetric fixed range, on integer formats. Other formats
    # take a fixed range as the symmetric bound max(|lo|, |hi|).
    asymmetric = fmt.supports_zero_points and (
        cal.method == "minmax" or (cal.method == "fixed" and cal.lo != -cal.hi))

    overflow = jnp.zeros_like(bad)          # blocks whose scale scale_dtype cannot hold
    if fmt.kind == "mx":
        amax = jnp.max(jnp.abs(xb), axis=red, keepdims=True)
        emax = math.floor(math.log2(fmt.value_max))
        # floor(log2(amax)) from frexp's exponent (amax = m * 2**e, m in [0.5, 1)): exact,
        # where XLA's log2 of 2**13, 2**15, ... lands just below the integer on a CPU
        exp = (jnp.frexp(jnp.where(amax > 0, amax, 1.0))[1] - 1).astype(jnp.float32) - emax
        exp = jnp.where(amax > 0, jnp.clip(exp, -127, 127), -127)
        scale_b = _pow2(exp)
        # amax == 0 gives scale 2^-127, which may flush to zero: keep such blocks at 0.
        y = jnp.where(amax > 0, xb / jnp.where(amax > 0, scale_b, 1.0), 0.0)
        codes = round_to_float(y, fmt.float_dtype)
        scales = _to_scale_shape(jnp.where(bad, MX_NAN_SCALE, exp + 127).astype(jnp.uint8), layout)
    else:
        if asymmetric:
            if cal.method == "minmax":
                lo = jnp.minimum(jnp.min(xb, axis=red, keepdims=True), 0.0)
                hi = jnp.maximum(jnp.max(xb, axis=red, keepdims=True), 0.0)
            else:
                lo = jnp.full(_expand_scale(jnp.zeros(layout.scale_shape), layout).shape,
                              min(cal.lo, 0.0))
                hi = jnp.full(lo.shape, max(cal.hi, 0.0))
            steps = 2 ** fmt.bits - 1     # hi / steps - lo / steps: no overflow near float32's max
            scale_b = hi / steps - lo / steps
        else:
            if cal.method == "fixed":
                bound = jnp.full(_expand_scale(jnp.zeros(layout.scale_shape), layout).shape,
                                 max(abs(cal.lo), abs(cal.hi)))
            else:
                bound = jnp.max(jnp.abs(xb), axis=red, keepdims=True)
                if cal.method == "rms":
                    # max(., 1): a block that is all padding (even_blocks) has no elements
                    count = jnp.maximum(_valid_counts(layout, xb.ndim), 1)
                    rms = jnp.sqrt(jnp.sum(xb * xb, axis=red, keepdims=True) / count)
                    bound = jnp.minimum(bound, cal.factor * rms)
            scale_b = bound / fmt.value_max
        if scale_dtype is not None:  # quantise with the scale as it will be stored
            # A scale past the dtype's largest finite value (float16: 65504) cannot be
            # stored: its block gets a NaN scale like a non-finite block (eager quantise
            # refuses it, see refuse_nonfinite), never an inf that decodes to NaN or inf.
            overflow = (scale_b > float(jnp.finfo(scale_dtype).max)) & ~bad
            scale_b = scale_b.astype(scale_dtype).astype(jnp.float32)
        safe = jnp.where(scale_b > 0, scale_b, 1.0)
        y = xb / safe
        if fmt.kind == "int":
            if asymmetric:
                zero = fmt.qmin - jnp.round(lo / safe)
                codes = jnp.clip(jnp.round(y) + zero, fmt.qmin, fmt.qmax)
                zeros = _to_scale_shape(zero.astype(jnp.int8), layout)
            elif fmt.binary:     # int1: the sign (0 counts as +)
                codes = jnp.where(y < 0, -1, 1)
            else:
                codes = jnp.clip(jnp.round(y), -fmt.qmax, fmt.qmax)
            codes = codes.astype(jnp.int8)
        elif fmt.kind == "codebook" and fmt.sign_magnitude:
            codes = nearest_code_sign_magnitude(y, fmt.codebook)
        elif fmt.kind == "codebook":
            codes = nearest_code(y, fmt.codebook)
        else:  # float
            codes = round_to_float(y, fmt.float_dtype)
        scale_b = jnp.where(bad | overflow, jnp.nan, scale_b)
        scales = _to_scale_shape(scale_b.astype(scale_dtype or jnp.float32), layout)

    codes = codes.reshape(x.shape)
    if fmt.packed:
        if fmt.kind == "mx":
            nibbles = jax.lax.bitcast_convert_type(codes, jnp.uint4).astype(jnp.uint8)
        else:
            nibbles = codes.astype(jnp.uint8) & 0xF
        data = pack_halves(nibbles, layout.axis)
    elif fmt.byte_floats:
        # float8 codes are stored as their bit patterns (uint8): XLA:CPU has no float8
        # arithmetic and converts float8 arrays to float16 around the ops that touch them,
        # hoisting the conversion of a whole stacked weight out of a `lax.scan` over its
        # layers (8x slower per step, measured); uint8 bytes are sliced as they are.
        data = jax.lax.bitcast_convert_type(codes, jnp.uint8)
    else:
        data = codes

    dq_scale = dq_offset = None
    if double_quant:
        scales, dq_scale, dq_offset = _double_quantize(scales)
    return dict(data=data, scales=scales, zeros=zeros, dq_scale=dq_scale, dq_offset=dq_offset,
                layout=layout, nonfinite_blocks=jnp.sum(bad, dtype=jnp.int32),
                overflow_blocks=jnp.sum(overflow, dtype=jnp.int32))


def refuse_nonfinite(nonfinite_blocks, w, who: str = "qkern.quantize", overflow_blocks=None,
                     scale_dtype=None) -> None:
    """Eager quantisation refuses non-finite weights (the policy in docs/formats.md): raise
    when `nonfinite_blocks` (the field of `quantize_array`) is concrete and positive; and
    weights whose scales `scale_dtype` cannot hold (`overflow_blocks`). Under a trace (jit,
    grad, vmap) there is nothing to check on the host; those blocks dequantise to NaN
    instead."""
    if not isinstance(nonfinite_blocks, Tracer) and int(nonfinite_blocks):
        n = int(jnp.sum(~jnp.isfinite(w)))
        raise ValueError(
            f"{n} of {w.size} values are NaN or inf; {who} refuses non-finite weights (they "
            "would otherwise hide a diverged or corrupt weight). Find where they came from "
            "(jnp.isfinite), or replace them first (jnp.nan_to_num) if that is what you want. "
            "(Under jit the blocks holding them dequantise to NaN instead.)")
    if (overflow_blocks is not None and not isinstance(overflow_blocks, Tracer)
            and int(overflow_blocks)):
        top = float(jnp.finfo(scale_dtype).max)
        raise ValueError(
            f"{int(overflow_blocks)} block(s) of this weight need a scale above {top:g}, the "
            f"largest {jnp.dtype(scale_dtype).name} value (largest |w| "
            f"{float(jnp.max(jnp.abs(w))):g}); {who} will not store an infinite scale. Use "
            "scale_dtype=jnp.bfloat16 or float32 (the default), or rescale the weight. (Under "
            "jit those blocks dequantise to NaN.)")


def _valid_counts(layout: Layout, ndim_blocked: int) -> jnp.ndarray:
    """Number of real (unpadded) elements in each block, broadcastable to block stats."""
    if layout.per_tensor:
        return jnp.asarray(float(np.prod(layout.shape)))
    counts = np.minimum(layout.block_size,
                        layout.length - layout.block_size * np.arange(layout.num_blocks))
    shape = [1] * ndim_blocked
    shape[layout.axis] = layout.num_blocks
    return jnp.asarray(counts.astype(np.float32).reshape(shape))


def nearest_code(y: jnp.ndarray, codebook: np.ndarray) -> jnp.ndarray:
    """Index (uint8) of the nearest codebook value (ties go to the smaller value).

    One compare per midpoint between neighbouring (sorted) values, each adding the step
    from one code index to the next: elementwise only, so XLA fuses it into the pass that
    scales the weight (a binary search, `jnp.searchsorted`, and a gather cost several
    times the memory pass)."""
    order = np.argsort(codebook, kind="stable")
    sorted_cb = codebook[order]
    mids = ((sorted_cb[1:] + sorted_cb[:-1]) / 2).astype(np.float32)
    code = jnp.full(jnp.shape(y), int(order[0]), jnp.int32)
    for i, mid in enumerate(mids):
        step = int(order[i + 1]) - int(order[i])
        code = code + jnp.where(y > mid, jnp.int32(step), jnp.int32(0))
    return code.astype(jnp.uint8)


def nearest_code_sign_magnitude(y: jnp.ndarray, codebook: np.ndarray) -> jnp.ndarray:
    """For codebooks whose codes 8..15 are the negatives of 0..7 (bitsandbytes' FP4):
    nearest magnitude among codes 0..7 (ties to the smaller magnitude), then the sign bit,
    as bitsandbytes does. Symmetric by construction: -x quantises to minus x's code."""
    mag = nearest_code(jnp.abs(y), codebook[:8])
    return jnp.where((y < 0) & (mag != 0), mag | 8, mag).astype(jnp.uint8)


def _double_quantize(scales: jnp.ndarray):
    flat = scales.astype(jnp.float32).reshape(-1)
    ok = jnp.isfinite(flat)         # a NaN scale (a block with non-finite weights) stays NaN
    offset = jnp.sum(jnp.where(ok, flat, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
    centred = jnp.where(ok, flat - offset, 0.0)
    n = flat.shape[0]
    nblk = -(-n // DQ_BLOCK)
    padded = jnp.pad(centred, (0, nblk * DQ_BLOCK - n)).reshape(nblk, DQ_BLOCK)
    dq_scale = jnp.max(jnp.abs(padded), axis=1) / 127.0
    safe = jnp.where(dq_scale > 0, dq_scale, 1.0)
    codes = jnp.clip(jnp.round(padded / safe[:, None]), -127, 127).astype(jnp.int8)
    codes = jnp.where(ok, codes.reshape(-1)[:n], DQ_NAN_CODE)
    return codes.reshape(scales.shape), dq_scale, offset


def round_to_float(y, float_dtype) -> jnp.ndarray:
    """`y` (float32) rounded to the nearest value of `float_dtype` (fp8/fp4 elements), ties
    to even, clipped to its largest finite value; returned in `float_dtype`.

    Rounds explicitly (frexp, a power-of-two spacing, round-half-even) rather than leaving
    it to XLA's conversion: inside some fusions XLA's CPU backend converts float32 to fp4
    through a wider float, rounding twice (3.4995 -> 3.5 -> 4.0 in e2m1).
    """
    info = jnp.finfo(float_dtype)
    mant = int(info.nmant)
    emin = int(info.minexp)                       # exponent of the smallest normal
    vmax = float(info.max)
    y = jnp.clip(y.astype(jnp.float32), -vmax, vmax)
    a = jnp.abs(y)
    _, e = jnp.frexp(a)                           # a = m * 2**e, m in [0.5, 1): exact
    e = jnp.maximum(e - 1, emin)                  # subnormals share the smallest spacing
    spacing = _pow2(e - mant)
    q = jnp.minimum(jnp.round(a / spacing) * spacing, vmax)
    return jnp.where(y < 0, -q, q).astype(float_dtype)


def _pow2(exp) -> jnp.ndarray:
    """2**exp in float32, exact. (`jnp.exp2` on XLA's CPU backend is not: 2**13 comes back
    as 8192.0039, which moved MX codes at rounding ties and MX scales by up to 3e-6 relative.)"""
    return jnp.ldexp(jnp.float32(1.0), jnp.asarray(exp).astype(jnp.int32))


def dequantize_scales(scales, dq_scale, dq_offset, fmt: Format) -> jnp.ndarray:
    """Stored scales -> float32 scales. The NaN markers (MX code 0xFF, double-quantised code
    -128) decode to NaN: they mark blocks that held non-finite weights."""
    if fmt.kind == "mx":
        s = scales.astype(jnp.int32)
        return jnp.where(s == MX_NAN_SCALE, jnp.float32(jnp.nan), _pow2(s - 127))
    if dq_scale is None:
        return scales.astype(jnp.float32)
    n = int(np.prod(scales.shape))
    per = jnp.repeat(dq_scale, DQ_BLOCK)[:n].reshape(scales.shape)
    v = scales.astype(jnp.float32) * per + dq_offset
    return jnp.where(scales == DQ_NAN_CODE, jnp.float32(jnp.nan), v)


def float_codes(data, fmt: Format):
    """Stored one-byte float8 codes as `fmt.float_dtype`: uint8 bit patterns (how
    `quantize` stores them) are bitcast; float8 arrays (QArrays built or saved before
    codes were stored as bytes) pass through, as does every other format's data."""
    if fmt.byte_floats and jnp.dtype(data.dtype) == jnp.dtype(jnp.uint8):
        return jax.lax.bitcast_convert_type(data, fmt.float_dtype)
    return data


def decode(data: jnp.ndarray, fmt: Format, axis: int) -> jnp.ndarray:
    """Stored codes -> unscaled float32 values, [..., npad, ...] along `axis`."""
    if fmt.packed:
        nib = unpack_halves(data, axis)
        if fmt.kind == "int":
            return (nib.astype(jnp.int32) - 16 * (nib >= 8)).astype(jnp.float32)
        if fmt.kind == "codebook":
            # On a mesh with Explicit axes JAX cannot infer the sharding of a lookup in
            # a replicated table by sharded codes: it is the codes'.
            return jnp.asarray(fmt.codebook).at[nib].get(out_sharding=explicit_sharding(nib))
        return jax.lax.bitcast_convert_type(nib.astype(jnp.uint4), fmt.float_dtype).astype(jnp.float32)
    return float_codes(data, fmt).astype(jnp.float32)


def dequantize_array(fmt: str | Format, data, scales, zeros, dq_scale, dq_offset,
                     layout: Layout, dtype, *, scales_decoded: bool = False) -> jnp.ndarray:
    """The logical array in `dtype`. `scales_decoded`: `scales` are float32 values already
    (`dequantize_scales`' result), not the stored scales (MX exponents, double-quantised
    codes)."""
    fmt = get_format(fmt)
    v = _blocked(decode(data, fmt, layout.axis), layout)
    if zeros is not None:
        v = v - _expand_scale(zeros.astype(jnp.float32), layout)
    if not scales_decoded:
        scales = dequantize_scales(scales, dq_scale, dq_offset, fmt)
    v = v * _expand_scale(scales.astype(jnp.float32), layout)
    v = v.reshape(v.shape[:layout.axis] + (layout.padded,) + v.shape[layout.axis + 2:])
    if layout.padded != layout.length:
        v = jax.lax.slice_in_dim(v, 0, layout.length, axis=layout.axis)
    return v.astype(dtype)
