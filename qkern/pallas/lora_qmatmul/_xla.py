"""The fused QLoRA matmul on the `xla` backend: qmatmul's xla kernel for the base product,
plus two small dots. On a CPU x is tiny next to W, so a second read of x is not worth
fusing away; the base product gets the native kernel at small M like any qmatmul."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .._backend import Selection
from .._operand import QOperand
from ..qmatmul import _xla as qmatmul_xla
from ..qmatmul.api import _run
from ..qmatmul._xla import dot

_F32 = jnp.float32


def forward(x2, op: QOperand, u, v, scale: float, config=None, *, transposed: bool = False,
            interpret: bool = False):
    """(y, xu) as the Pallas kernels return them: y in x2's dtype, xu = x2 @ u float32."""
    base = _run(x2, op, Selection("xla"), config, transposed)
    xu = dot(x2, u)
    y = base.astype(_F32) + scale * dot(xu, v.astype(_F32))
    return y.astype(x2.dtype), xu


SPACE = qmatmul_xla.SPACE
MAX_CONFIGS = qmatmul_xla.MAX_CONFIGS


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """The base product's space: qmatmul's xla candidates for the same direction."""
    kernel = "qmatmul_t" if problem.kernel == "lora_t" else "qmatmul"
    return qmatmul_xla.candidates(dataclasses.replace(problem, kernel=kernel), op, space,
                                  device_kind)
