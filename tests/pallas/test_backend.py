"""Backend selection: argument > qkern.backend(...) > QKERN_BACKEND > device."""

import jax
import pytest

import qkern
from qkern.pallas import _backend


def test_device_default_on_cpu():
    assert jax.default_backend() == "cpu"
    assert _backend.resolve().name == "xla"


def test_context_manager_nests_and_argument_wins(monkeypatch):
    monkeypatch.delenv("QKERN_BACKEND", raising=False)
    with qkern.backend("triton", interpret=True):
        assert _backend.resolve() == _backend.Selection("triton", True)
        with qkern.backend("mosaic_tpu"):
            assert _backend.resolve().name == "mosaic_tpu"
        assert _backend.resolve().name == "triton"
        assert _backend.resolve("xla").name == "xla"
    assert _backend.resolve().name == "xla"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("QKERN_BACKEND", "mosaic_tpu")
    assert _backend.resolve().name == "mosaic_tpu"
    with qkern.backend("xla"):
        assert _backend.resolve().name == "xla"
    monkeypatch.setenv("QKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        _backend.resolve()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="choose one of"):
        with qkern.backend("vulkan"):
            pass
