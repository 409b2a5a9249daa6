"""The dispatch trace: a JAX trace whose tracers carry `Value`s, and `quaxify`.

One trace per `quaxify` call, with its own tag, so quaxify nests: a trace treats every
value that is not one of its own tracers as a plain array of its parent. Rules and
defaults run under the parent trace.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Sequence

import jax

from .. import _compat
from . import _dispatch
from ._values import Value


# Filled by `_hops` (jit, cond, while, scan, checkpoint; custom_jvp and custom_vjp), which
# builds on this module: primitive -> handler(values, params), and "jvp"/"vjp" -> handler.
HIGHER_ORDER: dict[Any, Callable] = {}
CUSTOM_DERIVATIVES: dict[str, Callable] = {}


class _QTracer(_compat.Tracer):
    __slots__ = ("value",)

    def __init__(self, trace: "_QTrace", value: Value):
        # `aval()` may apply JAX operations to the Value's fields (`lax.stop_gradient`, say):
        # run it where those fields live, under the parent trace. JAX calls
        # `process_primitive` with the plain evaluation trace current.
        with _compat.set_current_trace(trace.parent_trace):
            aval = value_aval(value)
        super().__init__(trace, aval)
        self.value = value

    def full_lower(self):
        return self

    def __repr__(self):
        return f"QkernTracer({self.value!r})"


class _QTrace(_compat.Trace):
    def __init__(self, parent_trace, tag):
        super().__init__()
        self.parent_trace = parent_trace
        self.tag = tag

    # -- converting between tracers and values --------------------------------------
    def to_value(self, x: Any) -> Any:
        if isinstance(x, _QTracer) and x._trace.tag is self.tag:
            return x.value
        return x

    def wrap(self, x: Any) -> Any:
        return _QTracer(self, x) if isinstance(x, Value) else x

    def stage_value(self, val):
        # `jnp.asarray(1)` and friends lift a literal into the current trace: ours holds no
        # array of its own, so the parent stages it (as JAX's batching trace does).
        if isinstance(val, _QTracer) and val._trace.tag is self.tag:
            return val
        with _compat.set_current_trace(self.parent_trace):
            return self.parent_trace.stage_value(val)

    # -- primitives -------------------------------------------------------------------
    def process_primitive(self, primitive, tracers, params):
        values = [self.to_value(t) for t in tracers]
        with _compat.set_current_trace(self.parent_trace):
            if not any(isinstance(v, Value) for v in values):
                # Nothing of ours: hand it to the parent untouched (no dispatch cost).
                return primitive.bind(*values, **params)
            out = _process_values(primitive, values, params)
        if primitive.multiple_results:
            return [self.wrap(o) for o in out]
        return self.wrap(out)

    def process_call(self, call_primitive, f, tracers, params):
        # Call primitives (closed_call, core.call) are inlined into this trace.
        with _compat.set_current_trace(self):
            return f.call_wrapped(*tracers)

    # Custom-derivative functions are always rebound through qkern's wrappers, even with
    # no Value operand: the function may close over Values (tracers of this trace), which
    # only a trace with this tag can unwrap.
    def process_custom_jvp_call(self, primitive, fun, jvp, tracers, *, symbolic_zeros):
        values = [self.to_value(t) for t in tracers]
        with _compat.set_current_trace(self.parent_trace):
            outs = CUSTOM_DERIVATIVES["jvp"](fun, jvp, values, self.tag)
        return [self.wrap(o) for o in outs]

    def process_custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, *, out_trees,
                                symbolic_zeros):
        values = [self.to_value(t) for t in tracers]
        with _compat.set_current_trace(self.parent_trace):
            return CUSTOM_DERIVATIVES["vjp"](fun, fwd, bwd, out_trees, values, self.tag)

    def process_shard_map(self, primitive, fun, tracers, **params):
        values = [self.to_value(t) for t in tracers]
        if any(isinstance(v, Value) for v in values):
            warn_materialise(primitive)
        with _compat.set_current_trace(self.parent_trace):
            arrays = [_dispatch.materialise_checked(v) if isinstance(v, Value) else v
                      for v in values]
        return self.parent_trace.process_shard_map(primitive, fun, arrays, **params)


def value_aval(value: Value):
    """`value.aval()`, varying over every manual mesh axis any of its leaves varies over.

    Inside `shard_map` (check_vma=True) JAX types each array with the mesh axes it varies
    over, and inserts `pvary` where varying and invariant operands meet; a Value's tracer
    must say what its leaves say, or JAX mistakes it for a replicated array.
    """
    aval = value.aval()
    vma, like = frozenset(), None
    for leaf in jax.tree_util.tree_leaves(value):
        try:
            leaf_aval = jax.typeof(leaf)
        except TypeError:
            continue
        leaf_vma = _compat.aval_vma(leaf_aval)
        if leaf_vma - vma:
            vma, like = vma | leaf_vma, leaf_aval
    return _compat.aval_with_vma(aval, vma, like) if vma else aval


def _pvary_leaves(primitive, values, params):
    """`pvary` (invariant -> varying, a no-op on data) of a Value: of each of its leaves."""
    axes = tuple(params["axes"])
    out = [jax.tree_util.tree_map(lambda l: _compat.pvary_leaf(l, axes, params), v)
           if isinstance(v, Value) else _compat.pvary_leaf(v, axes, params) for v in values]
    return out if primitive.multiple_results else out[0]


# First-order primitives whose params hold a jaxpr only as a scalar combiner (scatter's
# update, a reduction's monoid): no Value can be inside it, so they take the default path
# (materialise, or a type's `default` rule) without the higher-order warning.
_COMBINER_PRIMITIVES = frozenset({
    "scatter", "scatter-add", "scatter-sub", "scatter-mul", "scatter-min", "scatter-max",
    "scatter-apply", "reduce", "reduce_window", "select_and_scatter", "select_and_scatter_add"})


def _process_values(primitive, values, params):
    """Dispatch a primitive with at least one Value operand (runs under the parent trace)."""
    rule = _dispatch.resolve(primitive, _dispatch.arg_types(values))
    if rule is not None:
        return rule.fn(*values, **params)
    if primitive is _compat.pvary_p and primitive is not None:
        return _pvary_leaves(primitive, values, params)
    handler = HIGHER_ORDER.get(primitive)
    if handler is not None:
        return handler(values, params)
    if _compat.jaxprs_in_params(params) and primitive.name not in _COMBINER_PRIMITIVES:
        warn_materialise(primitive)
        arrays = [_dispatch.materialise_checked(v) if isinstance(v, Value) else v
                  for v in values]
        return primitive.bind(*arrays, **params)
    return _dispatch.apply_default(primitive, values, params)


def warn_materialise(primitive) -> None:
    warnings.warn(
        f"qkern: the higher-order primitive {primitive} has no rule for qkern Values; "
        "its Value operands are materialised into plain arrays.",
        stacklevel=3,
    )


def run_with_values(fn: Callable, args: Sequence[Any], kwargs: dict | None = None,
                    selected: Callable[[Value], bool] = lambda v: True, tag=None) -> Any:
    """Call `fn(*args, **kwargs)` under a new dispatch trace.

    Every selected Value in the pytrees `args`/`kwargs` enters as a tracer of the new trace;
    Values in the output come back as Values. Runs under the current trace as parent. A
    given `tag` makes the new trace recognise tracers of an earlier trace with that tag.
    """
    kwargs = {} if kwargs is None else kwargs
    tag = _compat.TraceTag() if tag is None else tag
    with _compat.take_current_trace() as parent:
        trace = _QTrace(parent, tag)
        with _compat.no_leaks(trace):
            wrap = lambda x: _QTracer(trace, x) if isinstance(x, Value) and selected(x) else x
            # Rebuilding pytrees may read the trace state (Flax NNX's Variables record it,
            # and refuse writes from another), which `take_current_trace` leaves empty on
            # newer JAX: do it under the trace `fn` runs in, so a module may update its own
            # state (BatchNorm statistics, RNG counters) in `fn`.
            with _compat.set_current_trace(trace):
                args, kwargs = jax.tree_util.tree_map(wrap, (args, kwargs), is_leaf=_is_value)
                out = fn(*args, **kwargs)
            with _compat.set_current_trace(parent):
                out = jax.tree_util.tree_map(trace.to_value, out)
            del args, kwargs, wrap
    return out


def _is_value(x: Any) -> bool:
    return isinstance(x, Value)


def _filter_mask(spec: Any, tree: Any) -> Any:
    """Expand a filter_spec (bool, callable, or pytree prefix of those) over `tree`."""
    if isinstance(spec, bool):
        return jax.tree_util.tree_map(lambda _: spec, tree, is_leaf=_is_value)
    if callable(spec) and not isinstance(spec, Value):
        return jax.tree_util.tree_map(lambda x: bool(spec(x)), tree, is_leaf=_is_value)
    is_spec_leaf = lambda s: isinstance(s, bool) or callable(s) or s is None
    try:
        return jax.tree_util.tree_map(
            lambda s, sub: _filter_mask(False if s is None else s, sub), spec, tree,
            is_leaf=is_spec_leaf)
    except ValueError as e:
        raise ValueError(
            "quaxify: filter_spec must be a bool, a callable over leaves, or a pytree prefix "
            f"of (fn, args, kwargs) made of those; it does not match the call: {e}"
        ) from None


class _Quaxified:
    def __init__(self, fn: Callable, filter_spec: Any):
        self.fn = fn
        self.filter_spec = filter_spec
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args, **kwargs):
        tree = (self.fn, args, kwargs)
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_value)
        if not any(isinstance(x, Value) for x in leaves):
            return self.fn(*args, **kwargs)  # nothing to dispatch on: no trace at all
        spec = self.filter_spec
        if spec is True:
            selected_ids = {id(x) for x in leaves if isinstance(x, Value)}
        else:
            mask = jax.tree_util.tree_leaves(_filter_mask(spec, tree))
            if len(mask) != len(leaves):
                raise ValueError("quaxify: filter_spec did not resolve to one flag per leaf.")
            selected_ids = {id(x) for x, m in zip(leaves, mask) if m and isinstance(x, Value)}
        if not selected_ids:
            return self.fn(*args, **kwargs)
        call = lambda fn, *a, **k: fn(*a, **k)
        return run_with_values(call, (self.fn, *args), kwargs,
                               selected=lambda v: id(v) in selected_ids)

    def __get__(self, instance, owner):
        if instance is None:
            return self
        return functools.partial(self, instance)


def quaxify(fn: Callable, filter_spec: Any = True) -> Callable:
    """Return a version of `fn` that understands qkern Values.

    Every JAX primitive that touches a Value is dispatched to a registered rule (or the
    `default` rules); everything else runs as usual. `filter_spec` selects which Values are
    dispatched on at this level: True (all), False (none), a callable over the leaves of
    `(fn, args, kwargs)`, or a pytree prefix of `(fn, args, kwargs)` made of those. Values
    not selected pass through unchanged, typically to reach a nested `quaxify`.

        y = qkern.quaxify(model_apply)(qparams, x)
    """
    return _Quaxified(fn, filter_spec)
