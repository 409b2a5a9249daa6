import jax
import pytest

import qkern


@pytest.fixture
def keys():
    return jax.random.split(jax.random.PRNGKey(0), 8)


def make_lora(base, din, dout, rank, key, lead=(), alpha=None, dtype="float32"):
    """A LoraArray on `base` with random (non-zero) a and b, so the update matters."""
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (*lead, din, rank), dtype) / din ** 0.5
    b = jax.random.normal(kb, (*lead, rank, dout), dtype) / rank ** 0.5
    return qkern.LoraArray(base, a, b, alpha=alpha)
