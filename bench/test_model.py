"""pytest-benchmark suite: the demo's transformer, dense float32 against each format.

    pytest bench/test_model.py --benchmark-only --benchmark-group-by=param:tokens

The model of `qkern demo` (qkern/_demo/random_model.py: pre-norm attention + GELU MLP,
random weights) with every projection quantised, run under `qkern.quaxify`, against the
same jitted model on float32 weights. Nothing is asserted about time.
"""

import jax
import jax.numpy as jnp
import pytest

import qkern
from qkern._demo import random_model

LAYERS, WIDTH, FFN = 2, 256, 1024


@pytest.fixture(scope="module")
def model():
    params, heads = random_model.init_params(jax.random.PRNGKey(0), layers=LAYERS,
                                             width=WIDTH, ffn=FFN)
    return params, heads


@pytest.mark.parametrize("tokens", [1, 16, 128])
@pytest.mark.parametrize("fmt", ["dense", "int8", "int4", "nf4", "fp8_e4m3"])
def test_model(benchmark, model, fmt, tokens):
    params, heads = model
    x = jnp.ones((1, tokens, WIDTH))
    if fmt == "dense":
        fn, p = jax.jit(lambda p, x: random_model.apply(p, x, heads)), params
    else:
        fn = jax.jit(qkern.quaxify(lambda p, x: random_model.apply(p, x, heads)))
        p = qkern.quantize(params, fmt, where=r".*kernel")
    jax.block_until_ready(fn(p, x))
    benchmark(lambda: jax.block_until_ready(fn(p, x)))
