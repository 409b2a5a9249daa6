"""What every W8A8 backend computes, and what they share before their int8 product.

`check_w8a8_operand` and `check_act_scale` reject bad input with the same messages on every
backend; `quantize_activations` is the XLA pre-pass every backend runs (dynamic per-row
absmax, or one static scale), so all of them feed their int8 product bit-identical codes;
`reference` (also `w8a8_reference`) is the plain-jnp meaning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._operand import QOperand, reference_dequantize

_INT8_MAX = 127.0


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float -> (int8 codes [M, K], float32 scales [M, 1]); absmax per row.

    An all-zero row gets scale 0 and codes 0 (no division by zero).
    """
    x32 = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x32), axis=1, keepdims=True) / _INT8_MAX
    q = jnp.round(x32 / jnp.where(s > 0, s, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), s


def quantize_static(x: jax.Array, act_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float, act_scale a float32 scalar -> (int8 codes, float32 scales [M, 1]).

    xq = clip(round(x / act_scale), -127, 127); values beyond 127 * act_scale saturate.
    A zero scale gives y = 0 (it multiplies every product), never a division by zero.
    """
    x32 = x.astype(jnp.float32)
    s = act_scale.astype(jnp.float32)
    q = jnp.round(x32 / jnp.where(s != 0, s, 1.0))
    sx = jnp.broadcast_to(s, (x.shape[0], 1))
    return jnp.clip(q, -127, 127).astype(jnp.int8), sx


def quantize_activations(x: jax.Array, act_scale: jax.Array | None):
    """(int8 codes [M, K], float32 row scales [M, 1]): dynamic per row when act_scale is
    None, else the static per-tensor scale broadcast to every row."""
    return quantize_rows(x) if act_scale is None else quantize_static(x, act_scale)


def check_w8a8_operand(op: QOperand) -> None:
    if not isinstance(op, QOperand):
        raise TypeError(f"W8A8 needs a QOperand (qkern.pallas.stored_operand of an int8 "
                        f"QArray); got {type(op).__name__}.")
    if op.fmt.name != "int8" or op.zeros is not None:
        raise ValueError(
            f"W8A8 needs a symmetric int8 weight; got {op.fmt.name}"
            f"{' with zero points' if op.zeros is not None else ''}. Quantise with "
            "qkern.quantize(w, 'int8') (absmax, rms or a symmetric fixed range).")
    if jnp.dtype(op.data.dtype) != jnp.dtype(jnp.int8):
        raise ValueError(f"W8A8 needs int8 weight codes; got data of dtype {op.data.dtype}.")
    if op.data.ndim != 2 or op.scales.ndim != 2 or op.scales.shape[1] != op.data.shape[1] \
            or op.data.shape[0] != op.k_padded or op.k > op.k_padded:
        raise ValueError(
            f"int8 QOperand shapes disagree: data {op.data.shape}, scales "
            f"{op.scales.shape}, block_size {op.block_size}, K={op.k} (expected data "
            f"[{op.k_padded}, N] and scales [{op.num_blocks}, N]).")


def check_act_scale(act_scale) -> jax.Array | None:
    """None, or the static activation scale as a float32 scalar array.

    Takes a Python number or a scalar floating-point array (traced is fine); anything with
    a shape or an integer dtype is refused.
    """
    if act_scale is None:
        return None
    if isinstance(act_scale, (bool, np.bool_)):
        raise TypeError("act_scale must be a scalar float array, got a bool.")
    if isinstance(act_scale, (int, float, np.integer, np.floating)):
        return jnp.asarray(act_scale, jnp.float32)
    shape = getattr(act_scale, "shape", None)
    dtype = getattr(act_scale, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"act_scale must be a scalar float array or None; got "
                        f"{type(act_scale).__name__}.")
    if tuple(shape) != ():
        raise ValueError(
            f"act_scale must be a scalar (one static scale for the whole activation "
            f"tensor); got shape {tuple(shape)}. For per-row scales pass act_scale=None "
            "(dynamic absmax per row).")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"act_scale must be a floating-point scalar; got dtype {dtype}.")
    return jnp.asarray(act_scale).astype(jnp.float32)


def w8a8_reference(x: jax.Array, op: QOperand, act_scale: jax.Array | None = None
                   ) -> jax.Array:
    """Plain-jnp meaning of W8A8: the same activation quantisation, then a float32 product
    of the dequantised activations and weight (materialises W: tests only)."""
    xq, sx = quantize_activations(x, check_act_scale(act_scale))
    y = jnp.dot(xq.astype(jnp.float32) * sx, reference_dequantize(op),
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


reference = w8a8_reference
