"""pytest-benchmark suite: the quantised matmul against the dense matmul.

    pytest bench/test_qmatmul.py --benchmark-only --benchmark-group-by=param:m

Same comparison as `qkern bench` (qkern/_bench/qmatmul.py): dense float32 (bfloat16 on
GPU/TPU) `x @ w` and the quaxified `x @ qw` for each format, K = N = 4096. Compare rows
within a group; nothing is asserted about time.
"""

import jax
import jax.numpy as jnp
import pytest

import qkern

K = N = 4096
DTYPE = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@pytest.fixture(scope="module")
def weight():
    return jax.random.normal(jax.random.PRNGKey(0), (K, N), jnp.float32).astype(DTYPE)


@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("fmt", ["dense", "int8", "int4", "nf4", "fp8_e4m3"])
def test_matmul(benchmark, weight, fmt, m):
    x = jnp.ones((m, K), DTYPE)
    if fmt == "dense":
        fn, w = jax.jit(lambda x, w: x @ w), weight
    else:
        fn, w = jax.jit(qkern.quaxify(lambda x, w: x @ w)), qkern.quantize(weight, fmt)
    jax.block_until_ready(fn(x, w))
    benchmark(lambda: jax.block_until_ready(fn(x, w)))
