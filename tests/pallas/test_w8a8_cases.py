"""Shared W8A8 cases for test_w8a8*.py (no tests here).

Operands are built directly from random int8 codes and float32 scales rather than through
`qkern.quantize`: the kernels see exactly the same QOperand, and each new weight shape
costs no quantiser compile (interpret mode is slow enough). The stored rows past K (the
padding of the last block) hold random codes, not zeros, so a kernel that fails to zero
its x padding shows up. test_w8a8.py checks real `qkern.quantize` operands too.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qkern.formats import get_format
from qkern.pallas._operand import QOperand

# weight scale layouts W8A8 takes: block size along K (None: one block, per channel)
LAYOUTS = {"per-channel": None, "block128": 128, "block64": 64}


def int8_operand(k: int, n: int, block: int | None = None, seed: int = 0) -> QOperand:
    """A symmetric int8 QOperand of a [k, n] weight with `block` rows per scale."""
    rng = np.random.default_rng(seed)
    b = k if block is None else block
    nb = -(-k // b)
    data = rng.integers(-127, 128, (nb * b, n), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, (nb, n)) / 127).astype(np.float32)
    return QOperand(jnp.asarray(data), jnp.asarray(scales), None, get_format("int8"), b, k)


def activation(m: int, k: int, dtype, seed: int = 1):
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    x[:, ::7] *= 4.0                                 # rows with a spread of magnitudes
    return jnp.asarray(x).astype(dtype)
