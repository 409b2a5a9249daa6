"""Ragged (grouped) quantised matmul, for mixture-of-experts layers: `api.py` selects a
backend and defines the gradient; `base.py` holds the stacked operand, the reference and
the checks; `_xla.py` (a schedule of row windows over the 2-D `qmatmul`) and
`_triton.py` (one Pallas kernel over (row tile, expert) work items) are the backends."""

from .api import ragged_qmatmul
from .base import StackedOperand

__all__ = ["ragged_qmatmul", "StackedOperand"]
