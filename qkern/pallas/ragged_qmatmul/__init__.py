"""Ragged (grouped) quantised matmul, for mixture-of-experts layers: `api.py` selects a
backend and defines the gradient; `base.py` holds the stacked operand, the reference and
the checks; `_xla.py` (a schedule of row windows over the 2-D `qmatmul`), `_triton.py`
and `_mosaic.py` (one Pallas kernel each over (row tile, expert) work items) are the
backends."""

from .api import ragged_qmatmul
from .base import StackedOperand

__all__ = ["ragged_qmatmul", "StackedOperand"]
