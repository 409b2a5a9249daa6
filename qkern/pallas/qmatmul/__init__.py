"""Weight-only quantised matmul, `x @ W` and `dy @ W.T`: `api.py` selects a backend and
defines the gradient; `base.py` holds the reference and the operand checks; one module per
backend (`_xla.py`, with the native CPU kernel in `_native/`; `_triton.py`; `_mosaic.py`)."""

from .api import qmatmul

__all__ = ["qmatmul"]
