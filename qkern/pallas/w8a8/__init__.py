"""W8A8 matmul (int8 activations times an int8 weight): `api.py` selects a backend and
defines the gradient; `base.py` holds the checks, the activation pre-pass and the
reference; one module per backend (`_xla.py`, `_triton.py`, `_mosaic.py`)."""

from .api import w8a8_matmul

__all__ = ["w8a8_matmul"]
