"""What every backend of the fused QLoRA matmul shares: the check of the LoRA factors and
the plain-jnp reference (`qkern.pallas.lora_qmatmul` re-exports both)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._operand import QOperand, reference_dequantize
from ..qmatmul.base import DTYPES

_F32 = jnp.float32


def check_factors(u, v, din: int, dout: int, who: str) -> int:
    """Validate LoRA factors u [din, r], v [r, dout] (every backend); return r."""
    for name, a in (("u", u), ("v", v)):
        if not hasattr(a, "ndim") or a.ndim != 2:
            raise ValueError(f"{who}: factor {name} must be 2-D; got shape "
                             f"{getattr(a, 'shape', None)}.")
        if jnp.dtype(a.dtype) not in DTYPES:
            raise ValueError(f"{who}: factor {name} has dtype {jnp.dtype(a.dtype).name}; use "
                             "float32, bfloat16 or float16.")
    r = u.shape[1]
    if u.shape[0] != din or v.shape != (r, dout) or r < 1:
        raise ValueError(f"{who}: factors u {tuple(u.shape)} and v {tuple(v.shape)} must be "
                         f"[{din}, r] and [r, {dout}] with the same r >= 1.")
    return r


def reference(x: jax.Array, op: QOperand, u: jax.Array, v: jax.Array, scale: float, *,
              transposed: bool = False) -> tuple[jax.Array, jax.Array]:
    """Plain jnp (y, xu) for one 2-D x: dequantise W whole, then two dots. Tests only."""
    w = reference_dequantize(op).astype(_F32)
    if transposed:
        w = w.T
    x32 = x.astype(_F32)
    xu = x32 @ u.astype(_F32)
    y = x32 @ w + scale * xu @ v.astype(_F32)
    return y.astype(x.dtype), xu
