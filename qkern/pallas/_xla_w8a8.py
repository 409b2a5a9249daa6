"""W8A8 on the `xla` backend, and the pieces every W8A8 backend shares.

Activations are quantised to int8, an int8 x int8 product is accumulated in int32, then
both scales are applied:

    y[m, n] = sx[m] * sum_b sw[b, n] * sum_{k in b} xq[m, k] * wq[k, n]

The weight must be a symmetric int8 QOperand (per channel, per tensor, or per block along
K). The activation scale sx is either dynamic, the absmax of each row / 127
(`quantize_rows`), or one static scale for the whole tensor (`act_scale`, from
calibration): xq = clip(round(x / act_scale), -127, 127).

Shared with the Pallas backends (_triton_w8a8.py, _mosaic_w8a8.py): `check_w8a8_operand`,
`check_act_scale`, `quantize_activations` (their XLA pre-pass, so every backend feeds its
int8 product with bit-identical codes) and `w8a8_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._operand import QOperand

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


def w8a8_xla(x: jax.Array, op: QOperand, act_scale: jax.Array | None = None) -> jax.Array:
    """y[M, N] = x[M, K] @ W with x quantised to int8 (per row, or by the static
    act_scale); output in x's dtype."""
    check_w8a8_operand(op)
    m, k = x.shape
    if k != op.k:
        raise ValueError(f"x has K={k} but the quantised weight has K={op.k}.")
    xq, sx = quantize_activations(x, act_scale)
    xq = jnp.pad(xq, ((0, 0), (0, op.k_padded - k)))
    nb, b, n = op.num_blocks, op.block_size, op.n
    if nb == 1:                                    # per channel / per tensor: one dot
        acc = jnp.dot(xq, op.data, preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * op.scales
    else:
        acc = jax.lax.dot_general(
            xq.reshape(m, nb, b), op.data.reshape(nb, b, n),
            (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)   # [nb, M, N]
        y = jnp.einsum("bmn,bn->mn", acc.astype(jnp.float32), op.scales)
    return (y * sx).astype(x.dtype)


def w8a8_reference(x: jax.Array, op: QOperand, act_scale: jax.Array | None = None
                   ) -> jax.Array:
    """Plain-jnp meaning of W8A8: the same activation quantisation, then a float32 product
    of the dequantised activations and weight (materialises W: tests only)."""
    from ._operand import reference_dequantize
    xq, sx = quantize_activations(x, check_act_scale(act_scale))
    y = jnp.dot(xq.astype(jnp.float32) * sx, reference_dequantize(op),
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
