"""Array types built on the extension API: QArray (quantised)."""

from . import _qarray_rules  # noqa: F401  (registers QArray's rules)
from .qarray import QArray

__all__ = ["QArray"]
