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


def test_a_backend_change_retraces_code_quaxify_already_traced():
    """Regression: quaxify's cache of inner jits (jnp's `x @ w` is one) kept the backend
    of the first trace, so a later `qkern.backend(...)` was ignored."""
    import jax
    import jax.numpy as jnp

    import qkern

    w = qkern.quantize(jax.random.normal(jax.random.PRNGKey(0), (256, 128)), "int8")
    x = jnp.ones((4, 256))

    def jaxpr():  # a fresh function each time (jax caches the trace of the same one)
        return str(jax.make_jaxpr(qkern.quaxify(lambda x, w: x @ w))(x, w))

    with qkern.backend("xla"):
        assert "pallas_call" not in jaxpr()
    with qkern.backend("triton", interpret=True):
        assert "pallas_call" in jaxpr()
    with qkern.backend("xla"):
        assert "pallas_call" not in jaxpr()
