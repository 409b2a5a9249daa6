"""The backend table: every family's implementations in one place, the xla fallback for
what a backend lacks, and the protocol each backend module follows."""

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import _backend, qmatmul, stored_operand
from qkern.pallas._config import KERNELS, Problem
from qkern.pallas.lora_qmatmul import lora_qmatmul
from qkern.pallas.w8a8 import w8a8_matmul

FAMILIES = {"qmatmul": ("forward", "transposed"), "w8a8": ("forward",),
            "lora_qmatmul": ("forward",), "ragged_qmatmul": ("forward", "transposed")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_registers_every_backend_with_the_protocol(family):
    impls = _backend._TABLE[family]
    assert set(impls) == set(_backend.BACKENDS)
    for name, module in impls.items():
        for attr in FAMILIES[family] + ("candidates",):
            assert callable(getattr(module, attr)), (family, name, attr)
        assert isinstance(module.SPACE, dict) and module.SPACE, (family, name)
        assert module.MAX_CONFIGS is None or module.MAX_CONFIGS > 0


def test_every_problem_kernel_names_a_registered_family():
    assert set(KERNELS.values()) <= set(FAMILIES)     # ragged_qmatmul has no tuned Problem
    assert Problem("xla", "lora_t", 1, 2, 3, "float32", "int8", 2).family == "lora_qmatmul"


def _op(fmt="int8", block_size=None, k=64, n=128):
    w = jax.random.normal(jax.random.PRNGKey(0), (k, n))
    return stored_operand(qkern.quantize(w, fmt, block_size=block_size))


def test_an_operand_mosaic_cannot_run_falls_back_to_xla_with_a_warning():
    op = _op(block_size=4)                   # Mosaic dequantises whole 8-row blocks only
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 64))
    want = qmatmul(x, op, backend="xla")
    with qkern.backend("mosaic_tpu", interpret=True):
        with pytest.warns(UserWarning, match=r"qmatmul runs on the xla backend here: "
                                             r"block_size 4 is not a multiple of 8"):
            _backend._warned.clear()
            got = qmatmul(x, op)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_an_explicit_backend_that_cannot_run_the_operand_raises():
    op = _op(block_size=4)
    x = jnp.ones((3, 64))
    with pytest.raises(ValueError, match=r"qmatmul: block_size 4 is not a multiple of 8.*"
                                         r"backend='xla'"):
        qmatmul(x, op, backend="mosaic_tpu", interpret=True)


@pytest.mark.parametrize("backend, block_size, why", [
    ("triton", 16, r"Triton W8A8 kernel needs scale blocks"),
    ("mosaic_tpu", 64, r"Mosaic W8A8 kernel needs blocks that are a multiple of 128"),
])
def test_w8a8_falls_back_where_its_kernel_cannot_run(backend, block_size, why):
    op = _op(block_size=block_size, k=128)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 128))
    want = w8a8_matmul(x, op, backend="xla")
    _backend._warned.clear()
    with qkern.backend(backend, interpret=True), pytest.warns(UserWarning, match=why):
        got = w8a8_matmul(x, op)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match=why):
        w8a8_matmul(x, op, backend=backend, interpret=True)


def test_lora_on_mosaic_falls_back_like_qmatmul():
    op = _op(block_size=4)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64))
    u, v = jnp.ones((64, 2)) / 8, jnp.ones((2, 128)) / 8
    want = lora_qmatmul(x, op, u, v, 0.5, backend="xla")
    _backend._warned.clear()
    with qkern.backend("mosaic_tpu", interpret=True), pytest.warns(UserWarning,
                                                                   match="lora_qmatmul"):
        got = lora_qmatmul(x, op, u, v, 0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_the_warning_is_given_once_per_reason():
    op = _op(block_size=4)
    x = jnp.ones((3, 64))
    _backend._warned.clear()
    with qkern.backend("mosaic_tpu", interpret=True), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        qmatmul(x, op)
        qmatmul(x + 1, op)
    assert sum("runs on the xla backend" in str(m.message) for m in w) == 1


def test_a_backend_without_the_family_falls_back_and_unknown_families_are_named(monkeypatch):
    xla = types.SimpleNamespace(forward=lambda *a, **k: "xla ran")
    monkeypatch.setitem(_backend._TABLE, "toy", {"xla": xla})
    _backend._warned.clear()
    with pytest.warns(UserWarning, match="the triton backend has no toy kernel"):
        module, sel = _backend.implementation("toy", _backend.Selection("triton"))
    assert module is xla and sel.name == "xla"
    with pytest.raises(ValueError, match="has no toy kernel"):
        _backend.implementation("toy", _backend.resolve("triton"))
    with pytest.raises(ValueError, match="unknown kernel family 'nope'"):
        _backend.implementation("nope", _backend.Selection("xla"))
