"""How `qkern.quantize(..., gptq=...)` feeds GPTQ: which leaves it applies to, their
Hessians, and the batched runs of `_gptq_core` (the maths for one weight)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..types.qarray import QArray
from . import _gptq_core
from ._gptq_core import GPTQ
from ._paths import path_str, selector
from ._rule import choose_rule, is_plain_array, weights_with_path


def gptq_one(w, fmt, gptq: GPTQ, *, axis, **options) -> QArray:
    """GPTQ for one array (`qkern.quantize(w, fmt, gptq=...)`), with its single Hessian."""
    w = jnp.asarray(w)
    _gptq_core.check_supported(fmt, options.get("calibration", "absmax"),
                               options.get("double_quant"), w.shape, axis)
    h = gptq.lookup(None, axis % w.ndim, w.shape[axis % w.ndim])
    return _gptq_core.gptq_quantize(w, h, fmt, axis=axis, damp=gptq.damp,
                                    act_order=gptq.act_order, **options)


def gptq_tree(tree, rules, gptq: GPTQ) -> dict:
    """GPTQ for every leaf of `tree` that `rules` quantise (as `qkern.quantize` selects
    them): {path: QArray, or the exception to raise for that leaf}, all leaves of one
    shape and format in one batched program."""
    selects = [selector(r.where) for r in rules]
    done: dict = {}
    jobs, paths = [], []
    leaves = weights_with_path(tree)
    for path, v in leaves:
        if not is_plain_array(v):
            continue
        p = path_str(path)
        i, why = choose_rule(p, v, rules, selects)
        if why is not None:
            continue
        r = rules[i]
        try:
            opts = r.options()
            _gptq_core.check_supported(r.fmt, opts["calibration"], opts["double_quant"],
                                       v.shape, r.axis)
            k_axis = r.axis % v.ndim
            h = gptq.lookup(p, k_axis, v.shape[k_axis])
            jobs.append(_gptq_core.prepare(v, h, r.fmt, act_fmt=r.act_fmt,
                                           compute_dtype=r.compute_dtype, **opts))
            paths.append(p)
        except (ValueError, TypeError) as e:
            done[p] = e
    for p, q in zip(paths, _gptq_core.run(jobs, gptq.damp, gptq.act_order)):
        done[p] = q
    return done
