"""One call from a model of any framework to a quantised model called like the original.

    qm = qkern.quantize_model(linen_module, variables, rules=rules)   # Flax Linen
    qm = qkern.quantize_model(nnx_module, rules=rules)                # Flax NNX
    qm = qkern.quantize_model(eqx_module, rules=rules)                # Equinox
    qm = qkern.quantize_model(apply_fn, params, rules=rules)          # plain JAX
    y = qm(x)                                  # the model's own code, under qkern.quaxify

The frameworks are recognised by type without importing them (a module of one can only
exist once its framework is imported), so none of them is a dependency.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax

from .._core import quaxify
from ._apply import dequantize, quantize


class QuantizedModel:
    """A quantised model: `qm(*args, **kwargs)` runs the model's own code under
    `qkern.quaxify` with the quantised weights (`qkern.quantize_model` builds it).

    `params`: the quantised weights in the framework's own form (Linen variables, an NNX
    `State`, the Equinox module itself, or your params pytree): save them (`qkern.save`),
    shard them (`qkern.shard`) or inspect them. `report`: the `qkern.QuantReport` of what
    was quantised. `framework`: "linen", "nnx", "equinox" or "function". `dequantized()`:
    the float model as a `QuantizedModel` of plain arrays (a reference to compare with).

    It is a pytree whose children are `params`: `jax.jit(lambda m, x: m(x))(qm, x)` compiles
    the whole model (`eqx.filter_jit` for Equinox modules, which hold non-array leaves).
    """

    def __init__(self, fn: Callable, params: Any, framework: str, report: Any = None):
        self.fn, self.params, self.framework, self.report = fn, params, framework, report

    def __call__(self, *args, **kwargs):
        return quaxify(self.fn)(self.params, *args, **kwargs)

    def dequantized(self) -> "QuantizedModel":
        return QuantizedModel(self.fn, dequantize(self.params), self.framework, self.report)

    def __repr__(self) -> str:
        what = "" if self.report is None else f", {len(self.report.rows)} leaves reported"
        return f"QuantizedModel({self.framework}{what})"


jax.tree_util.register_pytree_node(
    QuantizedModel,
    lambda m: ((m.params,), (m.fn, m.framework, m.report)),
    lambda aux, children: QuantizedModel(aux[0], children[0], aux[1], aux[2]))


def _linen_apply(module):
    return lambda variables, *args, **kwargs: module.apply(variables, *args, **kwargs)


def _nnx_apply(nnx, graphdef):
    return lambda state, *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs)


def _call_module(module, *args, **kwargs):
    return module(*args, **kwargs)


def _framework(model: Any, params: Any) -> tuple[str, Callable, Any]:
    """(framework, apply function `(weights, *args) -> out`, the weights to quantise)."""
    linen = sys.modules.get("flax.linen")
    nnx = sys.modules.get("flax.nnx")
    eqx = sys.modules.get("equinox")
    name = type(model).__name__
    if linen is not None and isinstance(model, linen.Module):
        if params is None:
            raise TypeError(f"qkern.quantize_model: a Flax Linen module ({name}) keeps no "
                            "weights; pass its variables too: quantize_model(module, "
                            "variables, rules=...), variables = module.init(...).")
        return "linen", _linen_apply(model), params
    if nnx is not None and isinstance(model, nnx.Module):
        if params is not None:
            raise TypeError(f"qkern.quantize_model: a Flax NNX module ({name}) holds its own "
                            "state; pass the module alone: quantize_model(module, rules=...).")
        graphdef, state = nnx.split(model)
        return "nnx", _nnx_apply(nnx, graphdef), state
    if eqx is not None and isinstance(model, eqx.Module):
        if params is not None:
            raise TypeError(f"qkern.quantize_model: an Equinox module ({name}) holds its own "
                            "weights; pass the module alone: quantize_model(module, rules=...).")
        return "equinox", _call_module, model
    if callable(model) and params is not None:
        return "function", model, params
    raise TypeError(
        f"qkern.quantize_model takes a Flax Linen module and its variables, a Flax NNX "
        f"module, an Equinox module, or an apply function `(params, *args) -> output` and "
        f"its params; got {name}" + (" without params." if params is None else "."))


def quantize_model(model: Any, params: Any = None, **options) -> QuantizedModel:
    """Quantise a model's weights by rules, in one call, and return it ready to run.

        qm = qkern.quantize_model(model, rules=[qkern.Rule(where=r".*kernel.*", fmt="nf4")])
        y = qm(x)                       # = the model on the quantised weights, via quaxify

    model: a Flax Linen module (with `params`, its variables), a Flax NNX module, an
    Equinox module, or a function `apply(params, *args, **kwargs)` (with `params`).
    options: `qkern.quantize`'s for a pytree (`rules=...`, or `fmt`/`where`/...;
    `report` is always taken). Returns a `QuantizedModel`: call it like the model, find the
    quantised weights in `.params` and what was quantised in `.report`.
    """
    framework, fn, weights = _framework(model, params)
    if "report" in options:
        raise TypeError("qkern.quantize_model always keeps the report (QuantizedModel.report); "
                        "drop report=.")
    if "rules" not in options and "fmt" not in options:
        raise TypeError("qkern.quantize_model needs rules=[qkern.Rule(...), ...] (or fmt= "
                        "and where=) to say which weights to quantise.")
    qweights, report = quantize(weights, report=True, **options)
    return QuantizedModel(fn, qweights, framework, report)
