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
from typing import Any

import jax
import numpy as np

from .. import _compat
from . import _trace
from ._dispatch import trace_context
from ._trace import run_with_values
from ._values import Value, materialise_checked

_flatten = jax.tree_util.tree_flatten
_unflatten = jax.tree_util.tree_unflatten


def _is_value(x):
    return isinstance(x, Value)


def _as_array(value: Any) -> Any:
    """A Value that must become a plain array inside a loop or branch, materialised.

    A type that refuses to materialise (Quax's `Unitful` does) but holds its array as its
    one leaf, with the Value's own shape and dtype, gives that leaf: what the rules
    returned, as Quax's trace would use it. Anything else raises a TypeError naming it.
    """
    if not isinstance(value, Value):
        return value
    try:
        return materialise_checked(value)
    except Exception as err:  # noqa: BLE001 - refusing types are retried below
        leaves = jax.tree_util.tree_leaves(value)
        aval = value.aval()
        if len(leaves) == 1 and jax.numpy.shape(leaves[0]) == tuple(aval.shape) \
                and jax.numpy.result_type(leaves[0]) == aval.dtype:
            return leaves[0]
        raise TypeError(
            f"qkern: a {type(value).__name__} must become a plain array here (a loop "
            f"carry whose type changes, a loop condition, or a branch output), but it "
            f"could not be materialised ({type(err).__name__}: {err}).") from err


def _materialise_all(xs):
    return [_as_array(x) for x in xs]


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
        init = _materialise_at(carry, forced)
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
    return [_as_array(x) if i in positions else x for i, x in enumerate(xs)]


def _while(values, params):
    """`while_p` bound directly (not the public `lax.while_loop`) on the leaves of the
    carried Values, with cond and body traced under fresh dispatch traces: JAX's own
    batching rule produces batched (non-scalar) predicates that only the primitive accepts.
    """
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cconsts, bconsts, carry = values[:nc], values[nc:nc + nb], list(values[nc + nb:])
    cond_fn = _compat.jaxpr_as_fun(params["cond_jaxpr"])
    body_fn = _compat.jaxpr_as_fun(params["body_jaxpr"])

    def body(c, forced, consts=bconsts):
        return _materialise_at(run_with_values(body_fn, [*consts, *c]), forced)

    init, forced = _settle_carry(_compat.while_p, body, carry)
    c_leaves, c_tree = _flatten(list(cconsts))
    b_leaves, b_tree = _flatten(list(bconsts))
    i_leaves, i_tree = _flatten(init)

    def cond_leaves(*leaves):
        consts = _unflatten(c_tree, leaves[:len(c_leaves)])
        c = _unflatten(i_tree, leaves[len(c_leaves):])
        (pred,) = run_with_values(cond_fn, [*consts, *c])
        return _as_array(pred)   # the loop needs a plain boolean

    def body_leaves(*leaves):
        consts = _unflatten(b_tree, leaves[:len(b_leaves)])
        c = _unflatten(i_tree, leaves[len(b_leaves):])
        out_leaves, out_tree = _flatten(body(c, forced, consts))
        if out_tree != i_tree:  # _settle_carry guarantees this; never a silent mismatch
            raise TypeError(f"qkern: while_loop body changed the carry's structure from "
                            f"{i_tree} to {out_tree}.")
        return out_leaves

    cond_jaxpr = jax.make_jaxpr(cond_leaves)(*c_leaves, *i_leaves)
    body_jaxpr = jax.make_jaxpr(body_leaves)(*b_leaves, *i_leaves)
    outs = _compat.while_p.bind(*c_leaves, *b_leaves, *i_leaves,
                                cond_nconsts=len(c_leaves), cond_jaxpr=cond_jaxpr,
                                body_nconsts=len(b_leaves), body_jaxpr=body_jaxpr)
    return list(_unflatten(i_tree, outs))


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


_trace.HIGHER_ORDER.update({
    _compat.jit_p: _jit,
    _compat.cond_p: _cond,
    _compat.while_p: _while,
    _compat.scan_p: _scan,
    _compat.remat_p: _remat,
})


# -- custom derivatives ---------------------------------------------------------------
def _dense_tangent(value: Any, leaves: list, tangent_leaves: list) -> Any:
    """The tangent of `materialise(value)` given tangents of its leaves."""
    tree = jax.tree_util.tree_structure(value)
    _, t = jax.jvp(lambda *ls: materialise_checked(_unflatten(tree, ls)), leaves, tangent_leaves)
    return t


def _input_tangent(value: Any, leaves: list, tangent_leaves: list) -> Any:
    """The tangent a custom_jvp rule sees for an operand given its leaves' tangents.

    For a plain array, its tangent. For a Value, the tangent of its materialised array;
    for a type that refuses to materialise, a Value of the same type built from the
    tangents of its leaves (Quax's convention, exact for types linear in their leaves).
    """
    if not isinstance(value, Value):
        return tangent_leaves[0]
    try:
        return _dense_tangent(value, leaves, tangent_leaves)
    except Exception:  # noqa: BLE001 - a type that will not materialise
        tree = jax.tree_util.tree_structure(value)
        return _unflatten(tree, [_compat.instantiate(t, jax.typeof(l))
                                 for l, t in zip(leaves, tangent_leaves)])


def _is_int_leaf(x) -> bool:
    return not jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.inexact)


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", None) or np.shape(x))


def _identity_leaf(primal: Value) -> int | None:
    """The index of the leaf that `primal.materialise()` returns unchanged, if it does (a
    wrapper type whose materialised array is its field), else None. Read off the jaxpr of
    `materialise`: no equations, and the output is one of the inputs."""
    leaves, tree = _flatten(primal)
    try:
        closed = jax.make_jaxpr(lambda *ls: materialise_checked(_unflatten(tree, ls)))(*leaves)
    except Exception:  # noqa: BLE001 - a type that will not materialise
        return None
    jaxpr = closed.jaxpr
    if jaxpr.eqns or len(jaxpr.outvars) != 1 or jaxpr.outvars[0] not in jaxpr.invars:
        return None
    return jaxpr.invars.index(jaxpr.outvars[0])


def _carriable(primal: Value, tangent: Any) -> bool:
    """Whether the tangent `tangent` (None: zero) of the Value output `primal` can be
    carried on `primal`'s leaves: a Value of the same structure, a zero, any tangent of an
    integer Value (it has none), or a plain array when `materialise` returns one leaf as it
    is. Works on the abstract values of `jax.eval_shape` too."""
    p_leaves, p_tree = _flatten(primal)
    if tangent is None or all(_is_int_leaf(l) for l in p_leaves):
        return True
    if not isinstance(tangent, Value):
        return _identity_leaf(primal) is not None
    t_leaves, t_tree = _flatten(tangent)
    return t_tree == p_tree and all(_shape(t) == _shape(l) for t, l in zip(t_leaves, p_leaves))


def _tangent_leaves(primal: Value, tangent: Any) -> list:
    """The tangents of `primal`'s leaves for a tangent that `_carriable` accepts."""
    p_leaves = jax.tree_util.tree_leaves(primal)
    if tangent is None or all(_is_int_leaf(l) for l in p_leaves):
        return [_zero_tangent(l) for l in p_leaves]
    if isinstance(tangent, Value):
        t_leaves = jax.tree_util.tree_leaves(tangent)
    else:
        i = _identity_leaf(primal)
        t_leaves = [tangent if j == i else _zero_tangent(l) for j, l in enumerate(p_leaves)]
    float0 = jax.dtypes.float0
    return [_zero_tangent(l) if _is_int_leaf(l) or getattr(t, "dtype", None) == float0
            else jax.numpy.asarray(t).astype(jax.numpy.result_type(l))
            for l, t in zip(p_leaves, t_leaves)]


def custom_jvp_with_values(fun, jvp, values: list, tag) -> list:
    """A custom_jvp call under a dispatch trace, rebound at the parent level.

    Value operands are flattened into their leaves. `fun` and `jvp` run under fresh
    dispatch traces that share the calling trace's `tag`, so Values they close over (tracers
    of the calling trace) are recognised too.

    An output that the rules give as a Value keeps its type (as in Quax: `jnp.logaddexp`
    of a custom type stays that type) whenever the JVP rule's tangent for it is a Value of
    the same structure, so that it can be carried leaf by leaf; an output whose tangent is
    a plain array is materialised, since JAX fixes each output's type from the function
    and the tangents must match it. Without differentiation the JVP rule is only traced
    abstractly to learn this.
    """
    leaves, in_tree = _flatten(values)
    run_same_tag = functools.partial(run_with_values, tag=tag)
    out_box: list = []   # (keep, treedefs) of the last trace of `call` or `call_jvp`

    def tangents_for(primal_leaves, tangent_leaves):
        vals = _unflatten(in_tree, list(primal_leaves))
        tans, i = [], 0
        for v in vals:
            n = len(jax.tree_util.tree_leaves(v))
            tans.append(_input_tangent(v, list(primal_leaves[i:i + n]),
                                       list(tangent_leaves[i:i + n])))
            i += n
        return vals, tans

    def run_jvp(primal_leaves, tangent_leaves, dry_run=False):
        vals, tans = tangents_for(primal_leaves, tangent_leaves)
        n = len(vals)
        # Tangents enter the dispatch trace too: a refusing type's tangent is a Value.
        return run_same_tag(
            lambda *vt: _compat.call_custom_jvp(jvp, list(vt[:n]), list(vt[n:]),
                                                dry_run=dry_run), [*vals, *tans])

    def kept(outs_p, outs_t) -> list[bool]:
        return [isinstance(p, Value) and _carriable(p, t) for p, t in zip(outs_p, outs_t)]

    def flat_outputs(outs, keep) -> list:
        flat, trees = [], []
        for o, k in zip(outs, keep):
            if k:
                ls, tree = _flatten(o)
                flat.extend(ls)
                trees.append(tree)
            else:
                flat.append(materialise_checked(o) if isinstance(o, Value) else o)
                trees.append(None)
        out_box[:] = [(list(keep), trees)]
        return flat

    @jax.custom_jvp
    def call(*leaves):
        outs = run_same_tag(fun.call_wrapped, _unflatten(in_tree, leaves))
        keep = [isinstance(o, Value) for o in outs]
        # A JVP rule may call its own function (jnp.logaddexp's does): while one probe runs,
        # nested calls keep their Values without probing again.
        if any(keep) and not _probing:
            _probing.append(True)
            try:
                zero = lambda ls: [_zero_tangent(l) for l in ls]
                probe_p, probe_t = jax.eval_shape(
                    lambda ls: run_jvp(ls, zero(ls), dry_run=True), list(leaves))
                keep = kept(probe_p, probe_t)
            except Exception:  # noqa: BLE001 - no usable JVP rule here: keep the types
                pass
            finally:
                _probing.pop()
        return flat_outputs(outs, keep)

    @call.defjvp
    def call_jvp(primal_leaves, tangent_leaves):
        outs_p, outs_t = run_jvp(primal_leaves, tangent_leaves)
        keep = kept(outs_p, outs_t)
        flat_p = flat_outputs(outs_p, keep)
        flat_t = []
        for p, t, k in zip(outs_p, outs_t, keep):
            if k:
                flat_t.extend(_tangent_leaves(p, t))
            else:
                dense_p = materialise_checked(p) if isinstance(p, Value) else p
                if t is None:
                    t = jax.numpy.zeros_like(dense_p)
                flat_t.append(materialise_checked(t) if isinstance(t, Value) else t)
        return flat_p, flat_t

    out_leaves = list(call(*leaves))
    (keep, trees), = out_box
    outs, i = [], 0
    for k, tree in zip(keep, trees):
        if k:
            n = tree.num_leaves
            outs.append(_unflatten(tree, out_leaves[i:i + n]))
            i += n
        else:
            outs.append(out_leaves[i])
            i += 1
    return outs


_probing: list = []   # non-empty while a custom_jvp's JVP rule is traced to learn its types


def _zero_tangent(leaf):
    """The zero tangent of one leaf (float0 for an integer leaf, as JAX wants)."""
    return (np.zeros(jax.numpy.shape(leaf), jax.dtypes.float0) if _is_int_leaf(leaf)
            else jax.numpy.zeros_like(leaf))


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


_trace.CUSTOM_DERIVATIVES.update(jvp=custom_jvp_with_values, vjp=custom_vjp_with_values)
