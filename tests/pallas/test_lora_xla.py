"""The fused QLoRA matmul on the xla backend (qkern/pallas/lora_qmatmul/api.py: the xla
quantised matmul plus two small dots): the contract (contract_lora.py), plus gradients in
both directions for more cases (cheap here), and backend selection by the context
manager, which the public API does the same way for every backend."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import qkern
from qkern.pallas.lora_qmatmul import lora_qmatmul

from .contract_lora import SCALE, LoraContract, check_grads, lora_case, ref
from .contract_qmatmul import assert_matches


class TestXla(LoraContract):
    backend = "xla"
    interpret = False

    @pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
    @pytest.mark.parametrize("fmt,opts,dtype", [("nf4", {}, jnp.float32),
                                                ("int4", dict(calibration="minmax"),
                                                 jnp.bfloat16)],
                             ids=["nf4-f32", "int4minmax-bf16"])
    def test_gradients_both_directions(self, fmt, opts, dtype, transposed):
        check_grads(self.lora, fmt, opts, 5, 320, 136, 12, dtype, transposed)


def test_context_manager_selects_the_backend():
    x, op, u, v = lora_case("int4", {}, 2, 256, 128, 4, jnp.float32, transposed=True)
    with qkern.backend("xla"):
        y = lora_qmatmul(x, op, u, v, SCALE, transposed=True)
    assert_matches(y, ref(x, op, u, v, transposed=True)[0])
