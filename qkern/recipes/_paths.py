"""Selecting leaves of a pytree by key path: shared by the recipes, loraify, save and shard."""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import jax


def path_str(path) -> str:
    """A key path as 'a/b/0/c' (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def compile_where(where: str) -> re.Pattern:
    """The regex `where`, compiled; a ValueError naming the pattern and what is wrong with it
    (rather than a bare `re.error` at the first leaf)."""
    try:
        return re.compile(where)
    except re.error as e:
        raise ValueError(
            f"where={where!r} is not a valid regular expression ({e}); `where` is matched in "
            "full against key paths such as 'layers/0/attn/kernel'.") from None


def selector(where: str | Callable | None) -> Callable[[str, Any], bool]:
    """`where` as a predicate (path, leaf) -> bool: a regex matched in full, or a callable.

    Raises ValueError for a regex that does not compile, TypeError for anything else that
    is neither a string, a callable nor None."""
    if where is None:
        return lambda path, leaf: True
    if isinstance(where, str):
        pattern = compile_where(where)
        return lambda path, leaf: pattern.fullmatch(path) is not None
    if callable(where):
        return lambda path, leaf: bool(where(path, leaf))
    raise TypeError(f"`where` must be a regex string or a predicate (path, leaf) -> bool, got {where!r}.")


def warn_no_match(who: str, where: Any, tree: Any, is_candidate: Callable[[Any], bool],
                  what: str, stacklevel: int = 3) -> None:
    """Warn that `where` selected nothing, listing the paths of the candidate leaves."""
    paths = [path_str(p) for p, v in jax.tree_util.tree_leaves_with_path(tree) if is_candidate(v)]
    shown = ", ".join(paths[:20]) + (" ..." if len(paths) > 20 else "")
    warnings.warn(f"{who}: where={where!r} matched no {what}. Paths: {shown}",
                  stacklevel=stacklevel + 1)
