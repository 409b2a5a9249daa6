"""Multiple dispatch of JAX primitives on the types of their arguments.

Written here, without a dispatch library: a rule is a function whose positional parameters
are annotated with `Value` subclasses, unions of them, `qkern.ArrayLike` or `object`. For a
call, the rules whose annotations match the argument types compete; the most specific wins,
`precedence` breaks ties, and a tie that remains is an error naming both rules.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable

import jax
import numpy as np

from .. import _compat
from ._values import ArrayLike, Value, materialise_checked

__all__ = ["register", "dispatch", "materialise_checked", "AmbiguousRuleError"]


class AmbiguousRuleError(TypeError):
    """Two registered rules match a call equally well and have the same precedence."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Rule:
    fn: Callable
    positional: tuple[tuple[type, ...], ...]  # one tuple of accepted classes per parameter
    varargs: tuple[type, ...] | None
    precedence: int
    required: int = 0  # positional parameters without a default

    def expand(self, n: int) -> tuple[tuple[type, ...], ...] | None:
        if len(self.positional) == n:
            return self.positional
        if self.varargs is None and self.required <= n < len(self.positional):
            return self.positional[:n]
        if self.varargs is not None and n > len(self.positional):
            return self.positional + (self.varargs,) * (n - len(self.positional))
        return None

    def describe(self) -> str:
        fn = self.fn
        code = getattr(fn, "__code__", None)
        where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
        sig = ", ".join(_describe_classes(c) for c in self.positional)
        if self.varargs is not None:
            sig += (", " if sig else "") + "*" + _describe_classes(self.varargs)
        return f"{getattr(fn, '__qualname__', fn)}({sig}){where}"


def _describe_classes(classes: tuple[type, ...]) -> str:
    names = [c.__name__ if c not in (ArrayLike,) else "ArrayLike" for c in classes]
    names = ["Any" if n == "object" else n for n in names]
    return " | ".join(names)


_rules: dict[Any, list[_Rule]] = {}
_cache: dict[tuple[Any, tuple[type, ...]], _Rule | None] = {}
_generation = [0]  # bumped by every registration; caches of traced code key on it


def generation() -> int:
    return _generation[0]


_context_providers: list = []


def register_trace_context(provider) -> None:
    """Register a zero-argument callable returning a hashable value that rules read while
    tracing (a kernel backend selection, say). Cached traces key on it with `generation()`:
    a change re-traces instead of reusing code traced under the old value."""
    _context_providers.append(provider)


def trace_context() -> tuple:
    return (_generation[0], *(p() for p in _context_providers))

_PLAIN_ARRAY_ANNOTATIONS = (jax.Array, np.ndarray)
# Python scalars dispatch on their own type (a rule annotated `k: int` matches a Python int,
# not an array); NumPy scalars likewise. Every other non-Value operand is `ArrayLike`.
_SCALAR_TYPES = (bool, int, float, complex, np.generic)


def _annotation_classes(annotation: Any, where: str, written: Any = None) -> tuple[type, ...]:
    """The classes an annotation accepts. `written` is the annotation as the user wrote it
    (a Union being expanded), named in the error."""
    written = annotation if written is None else written
    if annotation is typing.Any or annotation is object or annotation is inspect.Parameter.empty:
        return (object,)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(annotation):
            out.extend(_annotation_classes(arg, where, written))
        if ArrayLike in out:  # ArrayLike covers every array and scalar member
            out = [c for c in out if c is ArrayLike or not _is_plain_class(c)]
        return tuple(dict.fromkeys(out))
    if annotation is ArrayLike or annotation in _PLAIN_ARRAY_ANNOTATIONS:
        return (ArrayLike,)
    if isinstance(annotation, type) and issubclass(annotation, Value):
        return (annotation,)
    if isinstance(annotation, type) and issubclass(annotation, _SCALAR_TYPES):
        return (annotation,)
    if annotation is None or annotation is type(None):
        return (type(None),)
    raise TypeError(
        f"qkern.register: {where} is annotated {_annotation_name(written)}; dispatch "
        "annotations must be Value subclasses, qkern.ArrayLike (or jax.Array, np.ndarray, "
        "jaxtyping.ArrayLike), Python or NumPy scalar types (int, float, bool, complex, "
        "np.number), object, or a Union of these. Leave an operand unannotated to accept "
        "any type."
    )


def _is_plain_class(c: type) -> bool:
    return c is ArrayLike or (isinstance(c, type) and issubclass(c, _SCALAR_TYPES))


def _annotation_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return f"{annotation.__module__}.{annotation.__qualname__}".replace("builtins.", "")
    return repr(annotation)


def _parse_rule(fn: Callable, precedence: int) -> _Rule:
    if not callable(fn):
        raise TypeError(f"qkern.register expects a function, got {fn!r}.")
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise TypeError(f"qkern.register: cannot read the signature of {name}: {e}") from None
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # unresolvable string annotations
        raise TypeError(f"qkern.register: cannot resolve the annotations of {name}: {e}") from None

    positional: list[tuple[type, ...]] = []
    required = 0
    varargs = None
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            # Unannotated operands accept any type, as in Quax. A parameter with a default
            # is an optional operand: a primitive parameter of that name (`top_k_p`'s `k`)
            # arrives by keyword when fewer operands are passed.
            ann = hints.get(p.name, inspect.Parameter.empty)
            positional.append(_annotation_classes(ann, f"parameter {p.name!r} of {name}"))
            if p.default is p.empty:
                required = len(positional)
        elif p.kind is p.VAR_POSITIONAL:
            ann = hints.get(p.name, inspect.Parameter.empty)
            varargs = _annotation_classes(ann, f"*{p.name} of {name}")
        elif p.kind is p.KEYWORD_ONLY:
            ann = hints.get(p.name)
            if ann is not None and _looks_like_operand(ann):
                raise TypeError(
                    f"qkern.register: {name} declares the operand {p.name!r} keyword-only. "
                    "Operands are always passed positionally; keyword arguments receive the "
                    "primitive's parameters. Make it a positional parameter."
                )
    if not positional and varargs is None:
        raise TypeError(
            f"qkern.register: {name} has no positional parameters to dispatch on; "
            "declare the primitive's operands as annotated positional parameters."
        )
    return _Rule(fn, tuple(positional), varargs, int(precedence), required)


def _looks_like_operand(annotation: Any) -> bool:
    try:
        return any(c is ArrayLike or (c is not object and issubclass(c, Value))
                   for c in _annotation_classes(annotation, ""))
    except TypeError:
        return False


def register(primitive: Any, *, precedence: int = 0) -> Callable[[Callable], Callable]:
    """Register a dispatch rule for a JAX primitive, as a decorator.

        @qkern.register(jax.lax.mul_p)
        def _(x: Scaled, y: qkern.ArrayLike):
            return Scaled(x.data * y, x.scale)

    Positional parameters receive the primitive's operands, keyword parameters its params.
    The most specific matching rule is used; among equally specific rules the higher
    `precedence` wins. The rule runs outside the quaxify trace, so it may call `jax.jit`,
    `pallas_call`, custom-derivative functions or another `quaxify`.
    """
    if not isinstance(primitive, _compat.Primitive):
        raise TypeError(
            f"qkern.register expects a JAX primitive such as jax.lax.mul_p, got {primitive!r} "
            f"of type {type(primitive).__name__}."
        )

    def decorator(fn: Callable) -> Callable:
        rule = _parse_rule(fn, precedence)
        _rules.setdefault(primitive, []).append(rule)
        _cache.clear()
        _generation[0] += 1
        return fn

    return decorator


def _class_matches(t: type, c: type) -> bool:
    if c is object:
        return True
    if c is ArrayLike:
        return t is ArrayLike or issubclass(t, _SCALAR_TYPES)
    if t is ArrayLike:
        return False
    return issubclass(t, c)


def _covered(c1: type, classes: tuple[type, ...]) -> bool:
    return any(_class_matches(c1, c2) for c2 in classes)


def _at_least_as_specific(a: tuple, b: tuple) -> bool:
    # `a` accepts no more than `b` in every position.
    return all(all(_covered(c, cb) for c in ca) for ca, cb in zip(a, b))


def resolve(primitive: Any, arg_types: tuple[type, ...]) -> _Rule | None:
    key = (primitive, arg_types)
    try:
        return _cache[key]
    except KeyError:
        pass
    matches = []
    for rule in _rules.get(primitive, ()):
        sig = rule.expand(len(arg_types))
        if sig is not None and all(
            any(_class_matches(t, c) for c in cs) for t, cs in zip(arg_types, sig)
        ):
            matches.append((rule, sig))
    best = None
    if matches:
        maximal = [
            (r, s) for r, s in matches
            if not any(_at_least_as_specific(s2, s) and not _at_least_as_specific(s, s2)
                       for _, s2 in matches)
        ]
        top = max(r.precedence for r, _ in maximal)
        winners = [r for r, _ in maximal if r.precedence == top]
        if len(winners) > 1:
            names = "\n  ".join(r.describe() for r in winners)
            shown = ", ".join(_describe_classes((t,)) for t in arg_types)
            raise AmbiguousRuleError(
                f"Ambiguous rules for {primitive} with arguments ({shown}); these match "
                f"equally well:\n  {names}\nRegister a more specific rule, or give one of "
                "them a higher `precedence=`."
            )
        best = winners[0]
    _cache[key] = best
    return best


def arg_types(values) -> tuple[type, ...]:
    return tuple(type(v) if isinstance(v, (Value, *_SCALAR_TYPES)) else ArrayLike
                 for v in values)


def has_rule(primitive: Any) -> bool:
    return primitive in _rules


def _overridden_default(value: Value):
    fn = type(value).default
    return None if fn is Value.default else fn


def dispatch(primitive: Any, values: list, params: dict) -> Any:
    """Apply the rule for these argument types, or the `default` rules (see Value.default)."""
    rule = resolve(primitive, arg_types(values))
    if rule is not None:
        return rule.fn(*values, **params)
    return apply_default(primitive, values, params)


def apply_default(primitive: Any, values: list, params: dict) -> Any:
    defaults: dict[Callable, type] = {}
    for v in values:
        if isinstance(v, Value):
            fn = _overridden_default(v)
            if fn is not None:
                defaults.setdefault(fn, type(v))
    if len(defaults) > 1:
        names = " and ".join(t.__name__ for t in defaults.values())
        raise TypeError(
            f"No rule for {primitive} with these arguments, and both {names} override "
            "Value.default, so qkern cannot choose between them. Register a rule for "
            f"{primitive} with these types."
        )
    if defaults:
        (fn,) = defaults
        return fn(primitive, values, params)
    return Value.default(primitive, values, params)
