"""Recipes: which weights of a model get which format, and how their codes are chosen.

    _paths.py         key paths ("layers/0/attn/kernel") and `where` selectors; shared
                      with loraify, save/load and shard
    _rule.py          Rule (one line of a recipe), choose_rule (which rule claims a leaf),
                      QuantReport and nbytes
    _gptq_core.py     GPTQ's maths for one weight: the GPTQ options, check_supported,
                      prepare, run (weights of one shape and format batched), gptq_quantize
    _gptq_driver.py   GPTQ over a tree: which leaves the rules give it, their Hessians,
                      fed to prepare/run
    _apply.py         quantize / dequantize: one array, or a tree by rules (round to
                      nearest, or GPTQ through the driver)
    _qat.py           fake_quant, ste and FakeQuant: training against the served numbers
    _calibrate.py     calibrate (W8A8 activation scales) and hessians (GPTQ's statistics)
    _model.py         quantize_model: one call from a Linen/NNX/Equinox model (or an apply
                      function and its params) to a QuantizedModel called like the original

Inside, imports go one way: _model -> _apply; _qat -> _apply -> _gptq_driver -> _gptq_core, _rule, _paths;
_calibrate -> _paths. This package exports what `qkern` re-exports.
"""

from ._apply import dequantize, quantize
from ._calibrate import Hessians, calibrate, hessians
from ._gptq_core import GPTQ
from ._model import QuantizedModel, quantize_model
from ._qat import fake_quant, ste
from ._rule import QuantReport, Rule

__all__ = ["quantize", "dequantize", "Rule", "QuantReport", "fake_quant", "ste", "calibrate",
           "hessians", "Hessians", "GPTQ", "quantize_model", "QuantizedModel"]
