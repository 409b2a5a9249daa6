"""Convolutions with a quantised kernel: `api.py` (the public `qconv`, its gradient and the
backend table entry), `base.py` (the operand, the checks and the reference), `_xla.py` (the
only backend: XLA's own convolution on pieces of the kernel dequantised one at a time, or
int8 convolutions tap by tap for W8A8)."""

from .api import qconv
from .base import ConvOperand

__all__ = ["qconv", "ConvOperand"]
