"""Higher-order primitives with Value operands: jit, cond, while, scan, checkpoint,
custom_jvp and custom_vjp.

The pattern is the same for each: flatten every Value operand into its pytree leaves, call
the public JAX transform (`jax.jit`, `lax.switch`, `lax.while_loop`, `lax.scan`,
`jax.checkpoint`, `jax.custom_jvp`, `jax.custom_vjp`) at the parent level on those leaves,
and inside it rebuild the Values and evaluate the original jaxpr or function under a fresh
dispatch trace. So Values keep their type across the transform, jit stays a (cached) jit,
and custom derivative rules stay in force.
"""

from __future__ import annotations

import functools
import weakref
import warnings
from typing import Any, Callable

import jax

from .. import _compat
from ._dispatch import materialise_checked, trace_context
from ._trace import run_with_values
from ._values import Value

_flatten = jax.tree_util.tree_flatten
_unflatten = jax.tree_util.tree_unflatten


def _is_value(x):
    return isinstance(x, Value)


def _materialise_all(xs):
    return [materialise_checked(x) if isinstance(x, Value) else x for x in xs]


def _structure(xs) -> list:
    """Per element: the treedef and leaf shapes/dtypes, which must match across a loop or
    branches (weak types are JAX's business: it promotes them itself)."""
    out = []
    for x in xs:
        leaves, tree = _flatten(x)
        out.append((tree, tuple((tuple(getattr(l, "shape", ())), jax.numpy.dtype(
            getattr(l, "dtype", None) or jax.numpy.result_type(l))) for l in leaves)))
    return out


def _aval_key(leaves) -> tuple:
    return tuple(jax.typeof(l) for l in leaves)


# -- jit ------------------------------------------------------------------------------
# Cache of jitted leaf-functions, per inner jaxpr and per input structure, so a jit inside
# quaxify is traced once per signature, as it would be outside.
_jit_cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _jit(values, params):
    closed = params["jaxpr"]
    leaves, in_tree = _flatten(values)
    per_jaxpr = _jit_cache.setdefault(closed, {})
    # A rule registered later, or a changed setting that rules read (the kernel backend),
    # must be seen: re-trace.
    key = (in_tree, trace_context())
    entry = per_jaxpr.get(key)
    if entry is None:
        out_trees: dict = {}
        closed_ref = weakref.ref(closed)  # the cache entry must not keep its own key alive

        def leaf_fn(*leaves):
            fn = _compat.jaxpr_as_fun(closed_ref())
            outs = run_with_values(fn, _unflatten(in_tree, leaves))
            out_leaves, out_tree = _flatten(outs)
            out_trees[_aval_key(leaves)] = out_tree
            return out_leaves

        leaf_fn.__name__ = leaf_fn.__qualname__ = params.get("name", "jit")
        entry = (jax.jit(leaf_fn, keep_unused=params.get("keep_unused", False),
                         inline=params.get("inline", False)), out_trees)
        per_jaxpr[key] = entry
    jitted, out_trees = entry
    out_leaves = jitted(*leaves)
    return _unflatten(out_trees[_aval_key(leaves)], out_leaves)


# -- cond -----------------------------------------------------------------------------
def _cond(values, params):
    index, *operands = values
    if isinstance(index, Value):
        index = materialise_checked(index)
    branches = params["branches"]

    def make_branch(closed, materialise_out):
        fn = _compat.jaxpr_as_fun(closed)

        def branch(ops):
            outs = run_with_values(fn, ops)
            return _materialise_all(outs) if materialise_out else outs
        return branch

    kept = [make_branch(b, False) for b in branches]
    shapes = [_structure(jax.eval_shape(b, operands)) for b in kept]
    if all(s == shapes[0] for s in shapes[1:]):
        fns = kept
    else:  # branches disagree on which outputs are Values: fall back to plain arrays
        fns = [make_branch(b, True) for b in branches]
    return list(jax.lax.switch(index, fns, operands))


# -- loops ----------------------------------------------------------------------------
def _settle_carry(primitive, body, carry: list) -> tuple[list, set]:
    """Find which carried Values must be materialised for the loop body to keep its type.

    Returns the initial carry (with those materialised) and the set of positions to
    materialise on the way out of the body.
    """
    forced: set = set()
    for _ in range(len(carry) + 1):
        init = [materialise_checked(c) if i in forced and isinstance(c, Value) else c
                for i, c in enumerate(carry)]
        out = jax.eval_shape(lambda c: body(c, forced), init)
        bad = {i for i, (a, b, x, y) in enumerate(zip(_structure(init), _structure(out), init, out))
               if a != b and (isinstance(x, Value) or isinstance(y, Value))}
        if not bad - forced:
            if forced:
                warnings.warn(
                    f"qkern: {primitive} carry positions {sorted(forced)} change Value type "
                    "or metadata in the loop body; they are carried as plain arrays.",
                    stacklevel=4)
            return init, forced
        forced |= bad
    raise TypeError(f"qkern: could not give the carry of {primitive} a fixed type.")


def _materialise_at(xs, positions):
    return [materialise_checked(x) if i in positions and isinstance(x, Value) else x
            for i, x in enumerate(xs)]


def _while(values, params):
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cconsts, bconsts, carry = values[:nc], values[nc:nc + nb], list(values[nc + nb:])
    cond_fn = _compat.jaxpr_as_fun(params["cond_jaxpr"])
    body_fn = _compat.jaxpr_as_fun(params["body_jaxpr"])

    def body(c, forced):
        return _materialise_at(run_with_values(body_fn, [*bconsts, *c]), forced)

    def cond(c):
        (pred,) = run_with_values(cond_fn, [*cconsts, *c])
        return materialise_checked(pred) if isinstance(pred, Value) else pred

    init, forced = _settle_carry(_compat.while_p, body, carry)
    return list(jax.lax.while_loop(cond, lambda c: body(c, forced), init))


def _scan_slices(x: Value, length: int) -> bool:
    """Whether scanning over a Value can slice its leaves (they all stack along axis 0)."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or any(jax.numpy.ndim(l) == 0 or jax.numpy.shape(l)[0] != length
                         for l in leaves):
        return False
    first = _unflatten(jax.tree_util.tree_structure(x), [l[0] for l in leaves])
    want, got = x.aval(), first.aval()
    return tuple(got.shape) == tuple(want.shape[1:]) and got.dtype == want.dtype


def _scan(values, params):
    n_consts, n_carry = _compat.scan_counts(params)
    length = params["length"]
    consts = values[:n_consts]
    carry = list(values[n_consts:n_consts + n_carry])
    xs = [materialise_checked(x) if isinstance(x, Value) and not _scan_slices(x, length) else x
          for x in values[n_consts + n_carry:]]
    fn = _compat.jaxpr_as_fun(params["jaxpr"])

    def step(c, x, forced):
        outs = run_with_values(fn, [*consts, *c, *x])
        new_c = _materialise_at(outs[:n_carry], forced)
        return new_c, _materialise_all(outs[n_carry:])  # stacked outputs: plain arrays

    x0 = [_unflatten(jax.tree_util.tree_structure(x), [l[0] for l in jax.tree_util.tree_leaves(x)])
          if isinstance(x, Value) else x[0] for x in xs] if length else xs
    init, forced = _settle_carry(_compat.scan_p, lambda c, f: step(c, x0, f)[0], carry)
    c_out, ys = jax.lax.scan(lambda c, x: step(c, x, forced), init, xs, length=length,
                             reverse=params["reverse"], unroll=params.get("unroll", 1))
    return [*c_out, *ys]


# -- checkpoint -----------------------------------------------------------------------
def _remat(values, params):
    jaxpr = params["jaxpr"]
    leaves, in_tree = _flatten(values)
    out_tree_box = []

    def leaf_fn(*leaves):
        outs = run_with_values(lambda *a: _compat.eval_open_jaxpr(jaxpr, *a),
                               _unflatten(in_tree, leaves))
        out_leaves, out_tree = _flatten(outs)
        out_tree_box.append(out_tree)
        return out_leaves

    out_leaves = jax.checkpoint(leaf_fn, prevent_cse=params.get("prevent_cse", True),
                                policy=params.get("policy"))(*leaves)
    return _unflatten(out_tree_box[-1], out_leaves)


HIGHER_ORDER: dict[Any, Callable] = {
    _compat.jit_p: _jit,
    _compat.cond_p: _cond,
    _compat.while_p: _while,
    _compat.scan_p: _scan,
    _compat.remat_p: _remat,
}


# -- custom derivatives ---------------------------------------------------------------
def _dense_tangent(value: Any, leaves: list, tangent_leaves: list) -> Any:
    """The tangent of `materialise(value)` given tangents of its leaves."""
    tree = jax.tree_util.tree_structure(value)
    _, t = jax.jvp(lambda *ls: materialise_checked(_unflatten(tree, ls)), leaves, tangent_leaves)
    return t


def custom_jvp_with_values(fun, jvp, values: list, tag) -> list:
    """A custom_jvp call under a dispatch trace, rebound at the parent level.

    Value operands are flattened into their leaves. `fun` and `jvp` run under fresh
    dispatch traces that share the calling trace's `tag`, so Values they close over (tracers
    of the calling trace) are recognised too. Outputs are materialised: JAX fixes the custom
    function's output types from its primal function, and a Value there could not be
    matched by the tangents.
    """
    leaves, in_tree = _flatten(values)
    run_same_tag = functools.partial(run_with_values, tag=tag)

    @jax.custom_jvp
    def call(*leaves):
        return _materialise_all(run_same_tag(fun.call_wrapped, _unflatten(in_tree, leaves)))

    @call.defjvp
    def call_jvp(primal_leaves, tangent_leaves):
        vals = _unflatten(in_tree, list(primal_leaves))
        tans, i = [], 0
        for v in vals:
            n = len(jax.tree_util.tree_leaves(v))
            ls, ts = list(primal_leaves[i:i + n]), list(tangent_leaves[i:i + n])
            tans.append(_dense_tangent(v, ls, ts) if isinstance(v, Value) else ts[0])
            i += n

        def run(*vs):
            return _compat.call_custom_jvp(jvp, list(vs), tans)

        outs_p, outs_t = run_same_tag(run, vals)
        return _materialise_all(outs_p), _materialise_all(outs_t)

    return list(call(*leaves))


def custom_vjp_with_values(fun, fwd, bwd, out_trees, values: list, tag) -> list:
    """A custom_vjp call under a dispatch trace, rebound at the parent level on the leaves
    of its operands (traces share `tag`, as for custom_jvp above).

    The user's fwd and bwd run under fresh dispatch traces, so residuals may be Values. The
    cotangent bwd gives for a Value operand (a plain array of its aval) is pulled back to
    the Value's leaves through `materialise`, so gradients reach the Value's fields.
    """
    leaves, in_tree = _flatten(values)
    run_same_tag = functools.partial(run_with_values, tag=tag)
    in_avals = [v.aval() if isinstance(v, Value) else jax.typeof(v) for v in values]

    @jax.custom_vjp
    def call(*leaves):
        return _materialise_all(run_same_tag(fun.call_wrapped, _unflatten(in_tree, leaves)))

    def call_fwd(*leaves):
        vals = _unflatten(in_tree, list(leaves))

        def run(*vs):
            return _compat.call_custom_vjp_fwd(fwd, out_trees, list(vs))

        res, outs = run_same_tag(run, vals)
        return _materialise_all(outs), (res, leaves)

    def call_bwd(saved, cts):
        res, leaves = saved
        vals = _unflatten(in_tree, list(leaves))
        ct_avals = [a.to_tangent_aval() if hasattr(a, "to_tangent_aval") else a
                    for a in in_avals]
        cts_in = run_same_tag(
            lambda *r: _compat.call_custom_vjp_bwd(bwd, list(r), list(cts), ct_avals), res)
        cts_in = _materialise_all(cts_in)
        out = []
        for v, ct in zip(vals, cts_in):
            if isinstance(v, Value):
                v_leaves, tree = _flatten(v)
                _, pull = jax.vjp(lambda *ls: materialise_checked(_unflatten(tree, ls)), *v_leaves)
                out.extend(pull(ct))
            else:
                out.append(ct)
        return tuple(out)

    call.defvjp(call_fwd, call_bwd)
    return list(call(*leaves))
