"""Array-like values that the dispatch trace understands.

`Value` is the base of every custom array type. Subclasses become frozen dataclasses and
pytrees as soon as they are defined: annotated fields are pytree children, fields declared
with `static_field()` are hashable metadata carried in the treedef.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import numpy as np

__all__ = ["Value", "ArrayValue", "ArrayLike", "static_field", "is_value",
           "materialise_checked", "has_array_leaf", "describe_leaf", "fields_repr"]

_STATIC = "qkern.static"


def static_field(**kwargs: Any) -> Any:
    """Declare a dataclass field as static metadata rather than a pytree child.

    Static fields must be hashable (they become part of the pytree's treedef, so changing
    one re-traces a jitted function). Accepts the keyword arguments of `dataclasses.field`.

        class Scaled(qkern.ArrayValue):
            data: jax.Array
            name: str = qkern.static_field(default="x")
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_STATIC] = True
    return dataclasses.field(metadata=metadata, **kwargs)


class _AvalAttribute:
    """`ArrayValue.shape` and friends: read from `aval()`.

    A non-data descriptor, so a subclass may still declare a field of the same name.
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(obj.aval(), self.name)


def _is_static(field: dataclasses.Field) -> bool:
    # `qkern.static_field()`, or Equinox's `eqx.field(static=True)` (metadata "static"),
    # which Quax users write on their Values.
    return bool(field.metadata.get(_STATIC, False) or field.metadata.get("static", False))


def _make_pytree(cls: type) -> None:
    fields = dataclasses.fields(cls)
    children = tuple(f.name for f in fields if not _is_static(f))
    static = tuple(f.name for f in fields if _is_static(f))
    child_keys = tuple(jax.tree_util.GetAttrKey(n) for n in children)

    def flatten_with_keys(obj):
        return (
            [(k, getattr(obj, n)) for k, n in zip(child_keys, children)],
            tuple(getattr(obj, n) for n in static),
        )

    def flatten(obj):
        return [getattr(obj, n) for n in children], tuple(getattr(obj, n) for n in static)

    def unflatten(aux, leaves):
        # Bypass __init__/__post_init__: JAX rebuilds pytrees with placeholder leaves.
        obj = object.__new__(cls)
        for n, v in zip(children, leaves):
            object.__setattr__(obj, n, v)
        for n, v in zip(static, aux):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)


class Value(abc.ABC):
    """An object that `qkern.quaxify` performs multiple dispatch on.

    Subclasses are frozen dataclasses and pytrees automatically. They implement `aval()`
    (the abstract value JAX sees) and `materialise()` (a plain array with that aval), and
    may override the static method `default` (see its docstring). Most array types should
    subclass `ArrayValue` instead.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__annotations__", {})
        for name in own:
            # A field that shadows an inherited `shape`/`dtype`/... attribute is a required
            # field, not one whose default is the inherited descriptor.
            if name not in cls.__dict__ and isinstance(getattr(cls, name, None), _AvalAttribute):
                setattr(cls, name, dataclasses.field())
        dataclasses.dataclass(frozen=True, eq=False)(cls)
        _make_pytree(cls)

    @abc.abstractmethod
    def aval(self) -> jax.core.AbstractValue:
        """The abstract value (usually a `jax.core.ShapedArray`) seen by JAX."""

    @abc.abstractmethod
    def materialise(self) -> Any:
        """A plain JAX array equal to this value, whose shape and dtype match `aval()`."""

    @staticmethod
    def default(primitive, values, params):
        """What to do for `primitive` when no registered rule matches the argument types.

        The rules, as in Quax: a registered rule for the types wins; otherwise, if exactly
        one of the argument types overrides `default`, its `default` runs; otherwise every
        Value is materialised and the primitive is bound normally; two argument types that
        both override `default` raise a TypeError at trace time.
        """
        arrays = [materialise_checked(v) if isinstance(v, Value) else v for v in values]
        return primitive.bind(*arrays, **params)


def _outside_quaxify(value: "Value", op: str):
    """The TypeError for an array operation on a Value itself: outside `quaxify` (or
    closed over by the quaxified function, which quaxify does not see)."""
    name = type(value).__name__
    plain = ("qkern.dequantize(q)" if name == "QArray" else "v.materialise()")
    raise TypeError(
        f"{op} on a {name}: a {name} is a qkern Value, not a JAX array, and behaves like "
        f"one only inside a function wrapped in qkern.quaxify, passed in as an argument "
        f"(a {name} the function closes over is not seen). Wrap the computation, e.g. "
        f"qkern.quaxify(model_fn)(params, x), or make a plain array with {plain}.")


class ArrayValue(Value):
    """A `Value` that behaves like an array: adds `.shape`, `.dtype`, `.ndim`, `.size`.

    Outside `quaxify` it is not an array: `@`, arithmetic, indexing and conversion to a
    NumPy array raise a TypeError saying to wrap the function in `qkern.quaxify` (inside,
    the function sees tracers and none of these methods run)."""

    shape = _AvalAttribute("shape")
    dtype = _AvalAttribute("dtype")
    ndim = _AvalAttribute("ndim")
    size = _AvalAttribute("size")

    def __matmul__(self, other):
        _outside_quaxify(self, "`@`")

    def __rmatmul__(self, other):
        _outside_quaxify(self, "`@`")

    def __add__(self, other):
        _outside_quaxify(self, "`+`")

    __radd__ = __add__

    def __sub__(self, other):
        _outside_quaxify(self, "`-`")

    __rsub__ = __sub__

    def __mul__(self, other):
        _outside_quaxify(self, "`*`")

    __rmul__ = __mul__

    def __truediv__(self, other):
        _outside_quaxify(self, "`/`")

    __rtruediv__ = __truediv__

    def __neg__(self):
        _outside_quaxify(self, "`-` (negation)")

    def __getitem__(self, index):
        _outside_quaxify(self, "indexing")

    def __array__(self, dtype=None, copy=None):
        _outside_quaxify(self, "conversion to a NumPy array")


def _is_plain_array_like(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))


class _ArrayLikeMeta(abc.ABCMeta):
    def __instancecheck__(cls, x: Any) -> bool:
        return not isinstance(x, Value) and _is_plain_array_like(x)

    def __repr__(cls) -> str:
        return "qkern.ArrayLike"


class ArrayLike(metaclass=_ArrayLikeMeta):
    """Annotation for rule arguments that are plain arrays or Python/NumPy scalars.

        @qkern.register(jax.lax.mul_p)
        def _(x: MyArray, y: qkern.ArrayLike): ...

    Also works with `isinstance`: `isinstance(jnp.ones(2), qkern.ArrayLike)` is True.
    """

    def __init__(self):
        raise TypeError("qkern.ArrayLike is an annotation, not a type to instantiate.")


# -- printing -------------------------------------------------------------------------------
# A Value's children are not always arrays: JAX rebuilds Values around whatever a tree
# function returns (`tree_map(lambda a: a.shape, tree)` gives tuples, `qkern.lora.partition`
# None, `jax.eval_shape` ShapeDtypeStructs, a trace tracers). Printing must work for all.
def has_array_leaf(x: Any) -> bool:
    """True for a child with an array's `shape` (a tuple) and `dtype`: an array, a tracer,
    a `jax.ShapeDtypeStruct`."""
    return isinstance(getattr(x, "shape", None), tuple) and hasattr(x, "dtype")


def describe_leaf(x: Any, limit: int = 60) -> str:
    """One child of a Value, short: `float32[64,2]` for an array or a ShapeDtypeStruct
    (`... traced` for a tracer), a Value's own repr, and the repr of anything else (a shape
    tuple, None), cut to `limit` characters."""
    if isinstance(x, Value):
        return repr(x)
    if has_array_leaf(x):
        try:
            dtype = np.dtype(x.dtype).name
        except TypeError:                 # extended dtypes (PRNG keys)
            dtype = str(x.dtype)
        out = f"{dtype}[{','.join(map(str, x.shape))}]"
        return out + " traced" if isinstance(x, jax.core.Tracer) else out
    try:
        out = repr(x)
    except Exception:                     # a repr must not fail because a child's does
        out = f"<{type(x).__name__}>"
    return out if len(out) <= limit else out[:limit - 3] + "..."


def fields_repr(value: "Value", names: tuple[str, ...] | None = None, *,
                static: bool = False) -> str:
    """`name=child, ...` for the pytree children of `value` (all, or `names`), each as
    `describe_leaf` writes it; static=True adds the static fields (`name=repr`)."""
    fields = dataclasses.fields(value)
    if names is None:
        names = tuple(f.name for f in fields if not _is_static(f))
    parts = [f"{n}={describe_leaf(getattr(value, n, None))}" for n in names]
    if static:
        parts += [f"{f.name}={describe_leaf(getattr(value, f.name, None))}"
                  for f in fields if _is_static(f)]
    return ", ".join(parts)


def is_value(x: Any) -> bool:
    return isinstance(x, Value)


def materialise_checked(value: Value) -> Any:
    """`value.materialise()`, checked against `value.aval()`.

    A disagreement would otherwise surface as a confusing shape error deep inside JAX.
    Errors raised by `materialise` itself propagate unchanged.
    """
    out = value.materialise()
    aval = value.aval()
    want_shape, want_dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    got_shape, got_dtype = np.shape(out), getattr(out, "dtype", None)
    if got_dtype is None:
        got_dtype = np.result_type(out)
    if want_shape is not None and (tuple(got_shape) != tuple(want_shape)
                                   or np.dtype(got_dtype) != np.dtype(want_dtype)):
        raise TypeError(
            f"{type(value).__name__}.aval() is {want_dtype}{list(want_shape)} but its "
            f"materialise() returned {np.dtype(got_dtype)}{list(got_shape)}; they must agree."
        )
    return out
