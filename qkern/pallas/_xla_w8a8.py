"""W8A8 on the `xla` backend: activations quantised to int8 per row on the fly, an
int8 x int8 product accumulated in int32, then both scales.

    y[m, n] = sx[m] * sum_b sw[b, n] * sum_{k in b} xq[m, k] * wq[k, n]

The weight must be a symmetric int8 QOperand (per channel or per block along K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._operand import QOperand


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float -> (int8 codes [M, K], float32 scales [M, 1]); absmax per row."""
    x32 = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x32), axis=1, keepdims=True) / 127.0
    q = jnp.round(x32 / jnp.where(s > 0, s, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), s


def check_w8a8_operand(op: QOperand) -> None:
    if op.fmt.name != "int8" or op.zeros is not None:
        raise ValueError(
            f"W8A8 needs a symmetric int8 weight; got {op.fmt.name}"
            f"{' with zero points' if op.zeros is not None else ''}. Quantise with "
            "qkern.quantize(w, 'int8') (absmax, rms or a symmetric fixed range).")


def w8a8_xla(x: jax.Array, op: QOperand) -> jax.Array:
    """y[M, N] = x[M, K] @ W with x quantised per row to int8; output in x's dtype."""
    check_w8a8_operand(op)
    m, k = x.shape
    if k != op.k:
        raise ValueError(f"x has K={k} but the quantised weight has K={op.k}.")
    xq, sx = quantize_rows(x)
    xq = jnp.pad(xq, ((0, 0), (0, op.k_padded - k)))
    nb, b, n = op.num_blocks, op.block_size, op.n
    acc = jax.lax.dot_general(
        xq.reshape(m, nb, b), op.data.reshape(nb, b, n),
        (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)   # [nb, M, N]
    y = jnp.einsum("bmn,bn->mn", acc.astype(jnp.float32), op.scales)
    return (y * sx).astype(x.dtype)


def w8a8_reference(x: jax.Array, op: QOperand) -> jax.Array:
    """Plain-jnp meaning of W8A8: the same row quantisation, exact integer arithmetic."""
    from ._operand import reference_dequantize
    xq, sx = quantize_rows(x)
    y = jnp.dot(xq.astype(jnp.float32) * sx, reference_dequantize(op),
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
