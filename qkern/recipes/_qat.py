"""Quantisation-aware training: fake quantisation with a straight-through gradient.

    def loss(params, x, y):
        qat = qkern.fake_quant(params, rules=rules)       # what serving will see
        return jnp.mean((model(qat, x) - y) ** 2)
    grads = jax.grad(loss)(params, x, y)                   # straight through to params
    ...
    qparams = qkern.quantize(params, rules=rules)          # serve: the same numbers

The forward pass of `fake_quant(w, ...)` is `qkern.dequantize(qkern.quantize(w, ...))`,
bit for bit, so a model trained with it and then served with `quantize` sees exactly the
weights it was trained with. The gradient ignores the rounding (the straight-through
estimator): d fake_quant(w) / dw = identity. With `kernels=True` (under `quaxify`) the
training forward pass runs the serving kernels themselves, so it is bit-identical to the
served model, matmul accumulation order included.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._core import ArrayLike, ArrayValue, register, static_field
from ..formats import get_format
from ..types._qarray_conv import qconv_dispatch
from ..types._qarray_matmul import qmatmul_dispatch
from ..types.qarray import QArray, as_compute_dtype
from ._apply import _quantize_one
from ._paths import path_str, selector
from ._rule import Rule, choose_rule, is_plain_array, map_weights


def ste(fn: Callable) -> Callable:
    """Make `fn(x, *args, **kwargs)` straight-through in `x`: the forward value is
    `fn(x, ...)` exactly, the derivative with respect to `x` is the identity (the other
    arguments get none). `fn` must return an array (or pytree of arrays) shaped like `x`.

        @qkern.ste
        def round_to_grid(w, step):
            return jnp.round(w / step) * step

        jax.grad(lambda w: round_to_grid(w, 0.1).sum())(w)   # == ones_like(w)

    Works in forward and reverse mode (a `jax.custom_jvp` whose tangent is passed through).
    """

    @functools.wraps(fn)
    def wrapped(x, *args, **kwargs):
        # The other arguments' arrays are inputs of the custom_jvp (their tangents are
        # dropped), never closed over: a step computed from a differentiated value is a
        # tracer of that differentiation, which a custom_jvp may not close over. Python
        # scalars, strings and the like stay as they are (static).
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        arrays = [i for i, v in enumerate(leaves) if isinstance(v, (jax.Array, np.ndarray))]

        def forward(x, dynamic):
            full = list(leaves)
            for i, v in zip(arrays, dynamic):
                full[i] = v
            a, kw = jax.tree_util.tree_unflatten(treedef, full)
            out = fn(x, *a, **kw)
            _check_like(out, x, fn)
            return out

        f = jax.custom_jvp(forward)

        @f.defjvp
        def _(primals, tangents):
            (x, dynamic), (dx, _) = primals, tangents
            return forward(x, dynamic), dx

        return f(x, [leaves[i] for i in arrays])

    return wrapped


def _check_like(out, x, fn) -> None:
    o, i = jax.tree_util.tree_structure(out), jax.tree_util.tree_structure(x)
    bad = o != i or any(jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b)
                        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(x)))
    if bad:
        name = getattr(fn, "__name__", repr(fn))
        raise TypeError(
            f"qkern.ste({name}): a straight-through function must return something shaped like "
            f"its first argument (same pytree, shapes and dtypes); got {jax.tree_util.tree_map(jnp.shape, out)} "
            f"of {[jnp.result_type(a).name for a in jax.tree_util.tree_leaves(out)]} for "
            f"{jax.tree_util.tree_map(jnp.shape, x)} of {[jnp.result_type(a).name for a in jax.tree_util.tree_leaves(x)]}.")


def _round_trip(w, fmt, *, block_size, axis, calibration, scale_dtype, double_quant):
    return _quantize_one(w, fmt, axis=axis, block_size=block_size, calibration=calibration,
                         who="qkern.fake_quant",
                         scale_dtype=scale_dtype, double_quant=double_quant).materialise()


_fake_quant_array = ste(_round_trip)


def fake_quant(w: Any, fmt: str | None = None, *, block_size: int | None = None,
               axis: int | None = -2, calibration: Any = "absmax", scale_dtype=None,
               double_quant: bool = False, rules: Sequence[Rule] | None = None,
               kernels: bool = False, compute_dtype: Any = None) -> Any:
    """Quantise and dequantise in the forward pass; straight-through gradient.

        w_q = qkern.fake_quant(w, "int4", block_size=32)     # one array, any format
        qat = qkern.fake_quant(params, rules=rules)           # a pytree, by the serving rules

    The forward value equals `qkern.dequantize(qkern.quantize(w, fmt, ...))` bit for bit
    (same options as `quantize`); with `rules`, each leaf is fake-quantised exactly as
    `qkern.quantize(params, rules=rules)` would quantise it, and every other leaf passes
    through. The gradient with respect to `w` is the identity. Works under jit and grad.

    kernels=True: return `FakeQuant` values instead of arrays, for a model run under
    `qkern.quaxify`. Their matmuls run the very kernels that serving runs (on the weight
    quantised in the forward pass, activations too for W8A8 rules), with the
    straight-through gradient, so the trained model's forward pass is bit-identical to
    `qkern.quaxify(model)(qkern.quantize(params, rules=rules), x)`; any other operation
    sees the fake-quantised array. compute_dtype (with kernels=True): as in
    `qkern.quantize`, the dtype those matmuls compute in (a rule's own `compute_dtype` with
    `rules`).
    """
    if compute_dtype is not None and not kernels:
        raise TypeError("qkern.fake_quant: compute_dtype applies to the kernels' matmuls; "
                        "pass kernels=True with it.")
    if rules is not None:
        if compute_dtype is not None:
            raise TypeError("qkern.fake_quant: with rules=, give compute_dtype in each "
                            "qkern.Rule(..., compute_dtype=...).")
        if fmt is not None:
            raise TypeError("qkern.fake_quant: give either `fmt` or `rules=`, not both.")
        return _fake_quant_tree(w, tuple(rules), kernels)
    fmt = "int8" if fmt is None else fmt
    if isinstance(w, QArray):
        raise TypeError("qkern.fake_quant needs the float weight; this one is a QArray already "
                        "(qkern.dequantize(q) is its float array).")
    if not isinstance(w, (jax.Array, np.ndarray, np.generic, float, int, complex)):
        raise TypeError(
            f"qkern.fake_quant(w, fmt) takes one array; for a pytree ({type(w).__name__}) give "
            f"the rules that serving uses: qkern.fake_quant(params, rules=[qkern.Rule("
            f"where=r'.*kernel', fmt={fmt!r})]).")
    if isinstance(w, (np.generic, float, int, complex)) or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise TypeError(f"qkern.fake_quant needs a floating array, got {w!r}.")
    options = dict(block_size=block_size, axis=axis, calibration=calibration,
                   scale_dtype=scale_dtype, double_quant=double_quant)
    if kernels:
        return _fake_quant_value(jnp.asarray(w), fmt, None, options,
                                 as_compute_dtype(compute_dtype))
    return _fake_quant_array(jnp.asarray(w), fmt, **options)


def _fake_quant_tree(tree, rules, kernels=False):
    selects = [selector(r.where) for r in rules]

    def leaf(path, v):
        if not is_plain_array(v):
            return v
        p = path_str(path)
        i, why = choose_rule(p, v, rules, selects)
        if why is not None:
            return v
        r = rules[i]
        try:
            if kernels:
                return _fake_quant_value(jnp.asarray(v), r.fmt, r.act_fmt, r.options(),
                                         r.compute_dtype)
            return _fake_quant_array(jnp.asarray(v), r.fmt, **r.options())
        except (ValueError, TypeError) as e:
            raise type(e)(f"cannot fake-quantise {p!r} (shape {tuple(v.shape)}, {v.dtype}) to "
                          f"{r.fmt} (rules[{i}] {r.describe()}): {e}") from None

    return map_weights(leaf, tree)


# -- QAT through the serving kernels -------------------------------------------------------
class FakeQuant(ArrayValue):
    """A float weight that, under `qkern.quaxify`, is quantised in the forward pass and
    multiplied by the serving kernels, with a straight-through gradient to `w`.

    Built by `qkern.fake_quant(..., kernels=True)`. `materialise()` is
    `fake_quant(w, ...)`: every operation other than a matmul sees the fake-quantised array.
    """

    w: jax.Array
    fmt: str = static_field(default="int8")
    options: tuple = static_field(default=())
    act_fmt: Any = static_field(default=None)
    compute_dtype: Any = static_field(default=None)

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.w), jnp.result_type(self.w))

    def materialise(self):
        return _fake_quant_array(self.w, self.fmt, **dict(self.options))

    def quantised(self, w=None):
        return _quantize_one(self.w if w is None else w, self.fmt, act_fmt=self.act_fmt,
                             compute_dtype=self.compute_dtype, **dict(self.options))


def _fake_quant_value(w, fmt, act_fmt, options, compute_dtype=None) -> FakeQuant:
    fq = FakeQuant(w, fmt=get_format(fmt).name, options=tuple(sorted(options.items())),
                   act_fmt=act_fmt, compute_dtype=compute_dtype)
    jax.eval_shape(lambda: _quantize_one(w, fmt, act_fmt=act_fmt, compute_dtype=compute_dtype,
                                         **options))  # fail early
    return fq


def _straight_through(fq: FakeQuant, serve, dense, x):
    """`serve(x, fq.quantised(w))` (the serving kernels) with the tangent of `dense(x, Wq)`,
    dWq = dw: straight through the weight's rounding (W8A8: also the activations')."""
    @jax.custom_jvp
    def f(x, w):
        return serve(x, fq.quantised(w))

    @f.defjvp
    def f_jvp(primals, tangents):
        # `f` itself for the value, so derivatives of every order come here
        (x, w), (dx, dw) = primals, tangents
        wq = fq.quantised(w).materialise()
        return f(x, w), dense(dx, wq) + dense(x, dw.astype(wq.dtype))

    return f(x, fq.w)


def _fq_matmul(lhs, rhs, params):
    w_on_right = isinstance(rhs, FakeQuant)
    fq, x = (rhs, lhs) if w_on_right else (lhs, rhs)

    def serve(x, q):
        return qmatmul_dispatch(x, q, params) if w_on_right else qmatmul_dispatch(q, x, params)

    def dense(x, wq):
        return jax.lax.dot_general_p.bind(*((x, wq) if w_on_right else (wq, x)), **params)

    return _straight_through(fq, serve, dense, x)


@register(jax.lax.dot_general_p)
def _(x: ArrayLike, w: FakeQuant, **params):
    return _fq_matmul(x, w, params)


@register(jax.lax.dot_general_p)
def _(w: FakeQuant, x: ArrayLike, **params):
    return _fq_matmul(w, x, params)


@register(jax.lax.conv_general_dilated_p)
def _(x: ArrayLike, w: FakeQuant, **params):
    """A convolution with a FakeQuant kernel runs the serving convolution (W8A8 included),
    straight through the kernel's rounding to `w`."""
    return _straight_through(
        w, lambda x, q: qconv_dispatch(x, q, params),
        lambda x, wq: jax.lax.conv_general_dilated_p.bind(x, wq, **params), x)
