"""The dispatch trace: Values, rules, quaxify and higher-order primitives."""

from ._dispatch import AmbiguousRuleError, register
from ._trace import quaxify
from ._values import ArrayLike, ArrayValue, Value, static_field
from . import _hops  # noqa: F401  (registers the higher-order handlers)

__all__ = ["Value", "ArrayValue", "ArrayLike", "static_field", "register", "quaxify",
           "AmbiguousRuleError"]
