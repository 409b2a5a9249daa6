"""What every qmatmul backend computes, and the checks every backend makes first.

`reference(x, op)` is x @ dequantise(W) in float32, cast to x's dtype (`transposed=True`:
x @ dequantise(W).T); it materialises the whole weight, for tests and small problems.
`check_operand` / `check_activation` reject malformed operands with the same messages on
every backend; what one backend alone cannot run is that backend's `unsupported(op)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._operand import QOperand, reference_dequantize

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def reference(x: jax.Array, op: QOperand, *, transposed: bool = False) -> jax.Array:
    """x @ dequantise(W) (or x @ dequantise(W).T) in float32, returned in x's dtype."""
    w = reference_dequantize(op)
    y = jnp.dot(x.astype(jnp.float32), w.T if transposed else w,
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def reference_t(dy: jax.Array, op: QOperand) -> jax.Array:
    """dy @ dequantise(W).T: the gradient's meaning (`reference(dy, op, transposed=True)`)."""
    return reference(dy, op, transposed=True)


def check_operand(op: QOperand) -> None:
    """A QOperand whose arrays agree with each other and with its format."""
    if not isinstance(op, QOperand):
        raise TypeError(f"expected a QOperand (qkern.pallas.QOperand), got {type(op).__name__}.")
    fmt, data, nb = op.fmt, op.data, op.num_blocks
    if data.ndim != 2 or op.scales.ndim != 2:
        raise ValueError(f"QOperand data and scales must be 2-D; got data {data.shape}, "
                         f"scales {op.scales.shape}.")
    n = data.shape[1]
    if tuple(op.scales.shape) != (nb, n):
        raise ValueError(f"scales shape {op.scales.shape} does not match data {data.shape} "
                         f"(expected ({nb}, {n})).")
    if op.zeros is not None and tuple(op.zeros.shape) != (nb, n):
        raise ValueError(f"zeros shape {op.zeros.shape} does not match scales {(nb, n)}.")
    want_rows = op.k_padded // 2 if fmt.packed else op.k_padded
    if data.shape[0] != want_rows:
        raise ValueError(f"{fmt.name} data has {data.shape[0]} rows; {nb} blocks of "
                         f"{op.block_size} need {want_rows}.")
    if fmt.packed and jnp.dtype(data.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"{fmt.name} data must be uint8 (two codes per byte); got "
                         f"{data.dtype}.")
    if not op.halves_aligned:
        raise ValueError(f"{fmt.name} operand has {nb} blocks: the high-nibble half does not "
                         "start on a block boundary; requantise (qkern pads to an even count).")
    if op.k > op.k_padded:
        raise ValueError(f"logical K={op.k} exceeds the {op.k_padded} stored rows.")


def check_activation(a, name: str, want: int, what: str) -> None:
    """A 2-D float activation [M, want] (name: "x" or "dy"; what: "K" or "N")."""
    if not hasattr(a, "ndim") or a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, {what}]; got shape "
                         f"{getattr(a, 'shape', None)} (vmap over leading dims).")
    if jnp.dtype(a.dtype) not in DTYPES:
        raise ValueError(f"{name} dtype {a.dtype} is not supported; use float32, bfloat16 "
                         "or float16.")
    if a.shape[1] != want:
        raise ValueError(f"{name} has {what}={a.shape[1]} (shape {a.shape}) but the "
                         f"quantised weight has {what}={want}.")
