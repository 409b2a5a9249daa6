"""Quantised matmul kernels and their selection.

`qmatmul(x, op)` runs x @ W for a `QOperand` (the kernels' view of a quantised weight) on
the selected backend; `qkern.pallas.w8a8.w8a8_matmul` with int8 activations, and
`qkern.pallas.lora_qmatmul.lora_qmatmul` with a fused low-rank update. How a QArray's
dot_general reaches them is QArray's business: `qkern/types/_qarray_matmul.py`. This
package knows `QOperand`, never `QArray`.
"""

from __future__ import annotations

from ._backend import backend
from ._config import MatmulConfig
from ._operand import QOperand, stored_operand
from .qmatmul.api import qmatmul
from .w8a8.api import w8a8_matmul

__all__ = ["qmatmul", "w8a8_matmul", "backend", "MatmulConfig", "QOperand",
           "stored_operand"]
