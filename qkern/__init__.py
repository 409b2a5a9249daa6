"""qkern: quantised and LoRA weights that behave like ordinary JAX arrays.

    import qkern
    y = qkern.quaxify(model_apply)(params_with_values, x)

See docs/ for the guides. Everything not re-exported here is private.
"""

from ._version import __version__
from ._core import (
    AmbiguousRuleError,
    ArrayLike,
    ArrayValue,
    Value,
    quaxify,
    register,
    static_field,
)
from .recipes import (
    GPTQ,
    Hessians,
    QuantReport,
    Rule,
    calibrate,
    dequantize,
    fake_quant,
    hessians,
    quantize,
    quantize_model,
    QuantizedModel,
    ste,
)
from ._checkpoint import CheckpointError, load, save
from ._sharding import partition_specs, per_device_bytes, shard, shardings
from .types import LoraArray, QArray
from . import lora
from .lora import loraify
from .pallas import backend
from . import autotune  # a package you can call: qkern.autotune(...) runs autotune.autotune


__all__ = [
    "Value",
    "ArrayValue",
    "ArrayLike",
    "static_field",
    "register",
    "quaxify",
    "AmbiguousRuleError",
    "QArray",
    "LoraArray",
    "loraify",
    "lora",
    "quantize",
    "dequantize",
    "quantize_model",
    "QuantizedModel",
    "Rule",
    "QuantReport",
    "fake_quant",
    "ste",
    "calibrate",
    "hessians",
    "Hessians",
    "GPTQ",
    "save",
    "load",
    "CheckpointError",
    "shard",
    "shardings",
    "partition_specs",
    "per_device_bytes",
    "backend",
    "autotune",
]
