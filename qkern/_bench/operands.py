"""Random kernel operands for the config sweeps (no quantisation pass needed)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..formats import get_format
from ..pallas._operand import QOperand


def random_int8_operand(rng: np.random.Generator, k: int, n: int, block: int = 0) -> QOperand:
    """A symmetric int8 QOperand of W [k, n]: random codes, scales in [0.004, 0.016], per
    channel (block 0) or in blocks of `block` rows along K."""
    b = block or k
    nb = -(-k // b)
    return QOperand(jnp.asarray(rng.integers(-127, 128, (nb * b, n), dtype=np.int8)),
                    jnp.asarray(rng.uniform(0.004, 0.016, (nb, n)).astype(np.float32)),
                    None, get_format("int8"), b, k)
