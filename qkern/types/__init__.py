"""Array types built on the extension API: QArray (quantised), LoraArray (low-rank update)."""

from . import _lora_rules, _qarray_conv, _qarray_rules  # noqa: F401  (register the types' rules)
from . import _qarray_ragged  # noqa: F401  (ragged_dot with stacked quantised experts)
from .lora import LoraArray
from .qarray import QArray

__all__ = ["QArray", "LoraArray"]
