"""Fused QLoRA matmul, `x @ W + scale * (x @ u) @ v`: `api.py` selects a backend and
defines the gradient; `base.py` holds the reference and the factor checks; one module per
Pallas backend (`_triton.py`, `_mosaic.py`; xla composes the weight-only kernel in api)."""

from .api import lora_qmatmul
from .base import check_factors, reference

__all__ = ["lora_qmatmul", "check_factors", "reference"]
