"""GPTQ: choose a weight's codes so that the layer's *outputs* stay close, not its weights.

Round-to-nearest (`qkern.quantize`) picks each code on its own. GPTQ (Frantar et al.
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
quantises the rows of a `[K, N]` kernel one at a time and spreads each row's rounding error
over the rows not yet quantised, weighted by how the layer's inputs correlate, so that
`X @ W_q` stays close to `X @ W` on the calibration inputs X. What it needs from X is
H = X^T X / rows, one `[K, K]` matrix per layer (`qkern.hessians` records them).

This module is the maths for one weight (`prepare`, then `run` batches weights of one shape
and format into one program); `_gptq_driver` picks a tree's leaves and feeds them here.

The result is an ordinary QArray: same format, storage, scales and kernels as
`qkern.quantize` gives; only the chosen codes (and the block scales, computed from the
error-updated weights at each block start) differ.

    hs = qkern.hessians(model, params, batches)                      # calibration
    qparams = qkern.quantize(params, rules=rules, gptq=hs)           # GPTQ instead of RTN
    qparams = qkern.quantize(params, rules=rules, gptq=qkern.GPTQ(hs, act_order=True))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..formats import get_format, parse_calibration, quantize_array
from ..formats._packing import pack_halves
from ..formats._quantize import (check_calibration, dequantize_scales, make_layout, nearest_code,
                                 refuse_nonfinite, round_to_float)
from ..types.qarray import QArray, as_compute_dtype

_CHUNK = 128          # rows per lazy batch update (the paper's B)


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """How `qkern.quantize(..., gptq=...)` runs GPTQ.

    hessians: a `qkern.Hessians` (from `qkern.hessians`), a mapping from key path to a
    `[K, K]` array, or (for one array: `qkern.quantize(w, fmt, gptq=...)`) one `[K, K]`
    array, where K is the length of the weight's block axis.
    damp: added to H's diagonal, as a fraction of its mean diagonal (the paper's 1%);
    larger is closer to round-to-nearest and more robust to few calibration rows.
    act_order: quantise rows in order of decreasing H diagonal (the inputs with the most
    energy first). Block scales are then computed from the weights before any update
    (AutoGPTQ's "static groups"), since a block's rows are no longer contiguous in time.
    """

    hessians: Any
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp):
            raise ValueError(f"GPTQ(damp={self.damp!r}): damp must be a number >= 0 "
                             "(a fraction of H's mean diagonal, e.g. 0.01).")
        if isinstance(self.hessians, GPTQ):
            raise TypeError("GPTQ(hessians=GPTQ(...)): pass the Hessians, not another GPTQ.")

    def lookup(self, path: str | None, k_axis: int, length: int) -> np.ndarray:
        """The `[K, K]` Hessian for the leaf at `path` (None: the single-array form)."""
        hs = self.hessians
        if path is None:
            if isinstance(hs, Mapping):
                raise TypeError("qkern.quantize(w, fmt, gptq=...) for one array takes one [K, K] "
                                "Hessian array, not a mapping of paths.")
            h = hs
        else:
            if not isinstance(hs, Mapping):
                raise TypeError(
                    "qkern.quantize(tree, ..., gptq=...) needs Hessians per leaf: a "
                    f"qkern.Hessians from qkern.hessians(...) or a dict of paths; got {type(hs).__name__}.")
            if path not in hs:
                known = ", ".join(sorted(hs)[:12]) + (" ..." if len(hs) > 12 else "")
                raise ValueError(
                    f"GPTQ: no Hessian for {path!r} (the calibration never saw an x @ W with this "
                    f"weight, or `where` left it out). Hessians are recorded for: {known or 'none'}. "
                    "Quantise that leaf without gptq= (a separate qkern.quantize call), or "
                    "calibrate with batches that reach it.")
            h = hs[path]
            axis = getattr(hs, "axis", {}).get(path)
            if axis is not None and axis != k_axis:
                raise ValueError(
                    f"GPTQ: {path!r} was contracted along axis {axis} in the calibration run, but "
                    f"the rule blocks it along axis {k_axis}; GPTQ needs the block axis to be the "
                    f"contracted one (Rule(axis={axis})).")
        h = np.asarray(h, np.float32) if not isinstance(h, jax.Array) else h
        if h.shape != (length, length):
            where = "the array" if path is None else repr(path)
            raise ValueError(f"GPTQ: the Hessian for {where} has shape {tuple(h.shape)}, but the "
                             f"weight's block axis has length {length}: expected ({length}, {length}).")
        return h


def check_supported(fmt, calibration, double_quant, shape, axis) -> None:
    fmt = get_format(fmt)
    cal = parse_calibration(calibration)
    if len(shape) != 2:
        raise ValueError(f"GPTQ quantises 2-D kernels ([in, out] or [out, in]); got shape "
                         f"{tuple(shape)}. A convolution kernel has no GPTQ path (its Hessian "
                         "would need the im2col view of the inputs): quantise it without gptq= "
                         "(its own qkern.quantize call, or leave it to a rule in a call without "
                         "gptq=). Quantise stacked weights slice by slice.")
    if axis is None:
        raise ValueError("GPTQ needs a block axis (the contracted one); axis=None (one scale "
                         "per tensor) is not supported: use axis=-2 (or the block axis).")
    if double_quant:
        raise ValueError("GPTQ with double_quant=True is not supported: the scales are chosen "
                         "block by block while quantising, before double quantisation could "
                         "round them. Use double_quant=False.")
    if fmt.kind == "mx" and cal.method != "absmax":
        raise ValueError(f"{fmt.name} takes absmax scales only.")


@dataclasses.dataclass(frozen=True)
class _Job:
    """One weight, validated and laid out as [K, N] float32 for the GPTQ program."""

    w: jax.Array                  # [K, N]
    h: jax.Array                  # [K, K]
    layout: Any
    dtype: Any
    act_fmt: str | None
    key: tuple                    # weights with equal keys run as one batched program
    perm: tuple | None = None     # (1, 0) for an [N, K] weight, stored as [K, N]
    compute_dtype: Any = None


def prepare(w, h, fmt, *, axis=-2, block_size=None, calibration="absmax", scale_dtype=None,
             double_quant=False, act_fmt=None, compute_dtype=None) -> _Job:
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"GPTQ expects a floating-point weight, got dtype {w.dtype}.")
    check_supported(fmt, calibration, double_quant, w.shape, axis)
    fmt = get_format(fmt)
    cal = check_calibration(fmt, calibration, double_quant)
    layout = make_layout(w.shape, fmt, block_size, axis, default_axis=False)
    h = jnp.asarray(h, jnp.float32)
    k = layout.length
    if h.shape != (k, k):
        raise ValueError(f"GPTQ: H has shape {tuple(h.shape)}, but axis {layout.axis} of the "
                         f"weight {tuple(w.shape)} has length {k}: expected ({k}, {k}).")
    if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError(f"GPTQ: the Hessian for the weight of shape {tuple(w.shape)} has "
                         "non-finite entries (NaN or inf in the calibration activations?).")
    refuse_nonfinite(jnp.sum(~jnp.isfinite(w)), w, "GPTQ")
    wk = w.astype(jnp.float32)
    perm = None
    if layout.axis == 1:          # [N, K]: run on [K, N], stored so (as `quantize` does)
        wk = wk.T
        layout = dataclasses.replace(layout, shape=tuple(wk.shape), axis=0)
        perm = (1, 0)
    key = (wk.shape, fmt.name, cal, scale_dtype, layout.block_size, layout.padded)
    return _Job(wk, h, layout, np.dtype(w.dtype), act_fmt, key, perm,
                as_compute_dtype(compute_dtype))


def run(jobs: list[_Job], damp: float, act_order: bool) -> list:
    """QArrays for `jobs` (or the FloatingPointError of a job whose factorisation failed).
    Weights of one shape and format run together, vmapped: one compiled program, and the
    row loop's fixed cost shared (MiniLM's 36 kernels run as 3 programs)."""
    out: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.key, []).append(i)
    for key, members in groups.items():
        shape, fmt, cal, scale_dtype, block_size, padded = key
        fields = _gptq_batched(jnp.stack([jobs[i].w for i in members]),
                               jnp.stack([jobs[i].h for i in members]), jnp.float32(damp),
                               jnp.bool_(act_order),
                               fmt=fmt, calibration=cal, scale_dtype=scale_dtype,
                               block_size=block_size, padded=padded)
        ok = fields.pop("ok")
        ok = None if isinstance(ok, jax.core.Tracer) else np.asarray(ok)
        for b, i in enumerate(members):
            job = jobs[i]
            if ok is not None and not ok[b]:
                out[i] = FloatingPointError(
                    f"GPTQ: the Cholesky factor of H^-1 is not finite for the weight of shape "
                    f"{tuple(job.layout.shape)} (H is too ill-conditioned in float32); raise "
                    f"damp (now {damp}), or calibrate with more rows.")
                continue
            f = {n: None if a is None else a[b] for n, a in fields.items()}
            out[i] = QArray(**f, fmt=fmt, layout=job.layout, dtype=job.dtype, act_fmt=job.act_fmt,
                            perm=job.perm, compute_dtype=job.compute_dtype)
    return out


def gptq_quantize(w, h, fmt, *, damp=0.01, act_order=False, **options):
    """One 2-D weight -> a QArray whose codes GPTQ chose, given H (`[K, K]`, K = the block
    axis, the one `x @ W` contracts). options: `qkern.quantize`'s (axis, block_size,
    calibration, scale_dtype, double_quant, act_fmt, compute_dtype)."""
    (q,) = run([prepare(w, h, fmt, **options)], damp, act_order)
    if isinstance(q, Exception):
        raise q
    return q


def _chunk(n: int, limit: int | None = None) -> int:
    """The largest divisor of n that is at most `limit` (default `_CHUNK`)."""
    limit = _CHUNK if limit is None else limit
    return next(c for c in range(min(n, limit), 0, -1) if n % c == 0)


def _block_scales(rows, bs, fmt, cal, scale_dtype):
    """(stored scales [nb, N], zero points [nb, N] or None, float32 scales [nb, N]) of the
    blocks of `bs` rows in `rows`, exactly as `qkern.quantize` computes them."""
    f = quantize_array(rows, fmt, axis=0, block_size=bs, calibration=cal,
                       scale_dtype=scale_dtype)
    scale = dequantize_scales(f["scales"], None, None, get_format(fmt))
    return f["scales"], f["zeros"], scale


def _round(w, scale, zero, fmt):
    """Codes (as float32: integer values, codebook indices, or float codes) and the
    dequantised values of one row `w` [N], given its scale (and zero point) [N], exactly
    as `qkern.quantize` rounds."""
    safe = jnp.where(scale > 0, scale, 1.0)
    y = w / safe
    if fmt.kind == "int":
        if zero is not None:
            z = zero.astype(jnp.float32)
            c = jnp.clip(jnp.round(y) + z, fmt.qmin, fmt.qmax)
            v = c - z
        elif fmt.binary:
            c = jnp.where(y < 0, -1.0, 1.0)
            v = c
        else:
            c = jnp.clip(jnp.round(y), -fmt.qmax, fmt.qmax)
            v = c
    elif fmt.kind == "codebook":
        if fmt.sign_magnitude:     # bitsandbytes' FP4: magnitude among codes 0..7, then sign
            mag = nearest_code(jnp.abs(y), fmt.codebook[:8])
            c = jnp.where((y < 0) & (mag != 0), mag | 8, mag)
        else:
            c = nearest_code(y, fmt.codebook)
        v = jnp.asarray(fmt.codebook)[c]
        c = c.astype(jnp.float32)
    else:  # float and mx elements
        y = jnp.where(scale > 0, y, 0.0)
        c = round_to_float(y, fmt.float_dtype).astype(jnp.float32)
        v = c
    return c, v * scale


def _pack(codes, fmt):
    """float32 codes [Kp, N] -> the QArray's `data`, as `quantize_array` stores it."""
    if fmt.kind == "int":
        codes = codes.astype(jnp.int8)
    elif fmt.kind == "codebook":
        codes = codes.astype(jnp.uint8)
    else:
        codes = codes.astype(fmt.float_dtype)
    if fmt.byte_floats:          # float8 codes are stored as their bits (quantize_array)
        return jax.lax.bitcast_convert_type(codes, jnp.uint8)
    if not fmt.packed:
        return codes
    if fmt.kind == "mx":
        nibbles = jax.lax.bitcast_convert_type(codes, jnp.uint4).astype(jnp.uint8)
    else:
        nibbles = codes.astype(jnp.uint8) & 0xF
    return pack_halves(nibbles, 0)


@functools.partial(jax.jit, static_argnames=("fmt", "calibration", "scale_dtype", "block_size",
                                             "padded"))
def _gptq_batched(ws, hs, damp, act_order, **static):
    """`_gptq_fields` over a stack of weights of one shape: [B, K, N], [B, K, K]."""
    return jax.vmap(functools.partial(_gptq_fields, **static),
                    in_axes=(0, 0, None, None))(ws, hs, damp, act_order)


def _gptq_fields(w, h, damp, act_order, *, fmt, calibration, scale_dtype, block_size, padded):
    """GPTQ on w [K, N] with H [K, K]; returns the QArray fields for blocks along axis 0.

    One compiled program per shape and format (damp and act_order are traced): Cholesky
    of H^-1, then a loop over chunks of rows (lazy batch updates), each a loop over its
    rows."""
    fmt_ = get_format(fmt)
    k, n = w.shape
    bs, nb = block_size, padded // block_size
    pad = padded - k
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    hp = jnp.pad(h, ((0, pad), (0, pad)))
    diag = jnp.diagonal(hp)
    real = jnp.arange(padded) < k
    # Inputs the calibration never saw (and padding) carry no information: an identity
    # diagonal keeps them out of the error propagation; they are rounded to nearest.
    dead = (diag <= 0) | ~real
    hp = jnp.where(dead[:, None] | dead[None, :], 0.0, hp)
    mean_diag = jnp.sum(jnp.where(dead, 0.0, diag)) / jnp.maximum(jnp.sum(~dead), 1)
    mean_diag = jnp.where(mean_diag > 0, mean_diag, 1.0)
    hp = hp + jnp.diag(jnp.where(dead, mean_diag, damp * mean_diag))

    perm = jnp.where(act_order, jnp.argsort(-jnp.where(real, jnp.diagonal(hp), -1.0), stable=True),
                     jnp.arange(padded))
    inv = jnp.argsort(perm)
    hq = hp[perm][:, perm]
    wq = wp[perm]
    # U upper triangular with H^-1 = U^T U (the paper's Cholesky form of the inverse).
    lower = jnp.linalg.cholesky(hq)
    hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(padded, dtype=jnp.float32))
    u = jnp.linalg.cholesky(hinv).T
    u = jnp.triu(u)

    group = perm // bs                                # each (permuted) row's block
    # Every block's scale from the weights before any update: what act_order keeps (static
    # groups: a block's rows are no longer quantised together); in order, each block's is
    # replaced at its first row.
    stored, zeros, scale = _block_scales(w, bs, fmt, calibration, scale_dtype)
    zeros = None if zeros is None else zeros.reshape(nb, n)
    stored, scale = stored.reshape(nb, n), scale.reshape(nb, n)
    chunk = _chunk(bs)

    def chunk_step(c, carry):
        wq, codes, stored, zeros, scale = carry
        start = c * chunk
        # In order (not act_order), a block starting here takes its scale from the current,
        # error-updated weights.
        g = start // bs
        if calibration.method == "rms" and k % bs:
            # rms counts a partial last block's rows: take block g of all the blocks'
            # scales computed on the unpadded rows, as qkern.quantize does.
            s_new, z_new, f_new = _block_scales(wq[:k], bs, fmt, calibration, scale_dtype)
            pick = g
        else:
            rows = jax.lax.dynamic_slice_in_dim(wq, jnp.minimum(start, padded - bs), bs, 0)
            s_new, z_new, f_new = _block_scales(rows, bs, fmt, calibration, scale_dtype)
            pick = 0
        fresh = (start % bs == 0) & ~act_order
        upd = lambda a, new: jnp.where(fresh, a.at[g].set(new[pick].astype(a.dtype)), a)
        stored, scale = upd(stored, s_new), upd(scale, f_new)
        if zeros is not None:
            zeros = upd(zeros, z_new)
        w1 = jax.lax.dynamic_slice_in_dim(wq, start, chunk, 0)
        u1 = jax.lax.dynamic_slice(u, (start, start), (chunk, chunk))
        g1 = jax.lax.dynamic_slice_in_dim(group, start, chunk, 0)

        def row_step(i, rc):
            w1, c1, e1 = rc
            row = w1[i]
            gi = g1[i]
            z = None if zeros is None else zeros[gi]
            code, q = _round(row, scale[gi], z, fmt_)
            err = (row - q) / u1[i, i]
            # later rows of this chunk take the error now (U is upper triangular)
            w1 = w1 - jnp.where(jnp.arange(chunk)[:, None] > i, u1[i][:, None] * err[None, :], 0.0)
            return w1, c1.at[i].set(code), e1.at[i].set(err)

        init = (w1, jnp.zeros((chunk, n), jnp.float32), jnp.zeros((chunk, n), jnp.float32))
        _, c1, e1 = jax.lax.fori_loop(0, chunk, row_step, init)
        # the rows after this chunk take its errors at once (lazy batch update)
        urows = jax.lax.dynamic_slice_in_dim(u, start, chunk, 0)           # [chunk, Kp]
        later = (jnp.arange(padded) >= start + chunk)[:, None]
        wq = wq - jnp.where(later, jnp.dot(urows.T, e1, precision=jax.lax.Precision.HIGHEST), 0.0)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, c1, start, 0)
        return wq, codes, stored, zeros, scale

    codes = jnp.zeros((padded, n), jnp.float32)
    _, codes, stored, zeros, scale = jax.lax.fori_loop(
        0, padded // chunk, chunk_step, (wq, codes, stored, zeros, scale))
    codes = codes[inv]
    return dict(data=_pack(codes, fmt_), scales=stored, zeros=zeros, ok=jnp.all(jnp.isfinite(u)))
