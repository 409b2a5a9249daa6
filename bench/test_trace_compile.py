"""pytest-benchmark suite for the dispatch trace: `pytest bench/ --benchmark-only`.

Same model as `qkern bench` (qkern/_bench/trace_compile.py): a 24-layer width-512 MLP whose
weights are a user-defined low-rank Value type, against the dense MLP. Compare the pairs
of rows with the same `group`; nothing here is asserted.
"""

import jax
import jax.numpy as jnp
import pytest

import qkern
from qkern._bench import trace_compile as tc

LAYERS, WIDTH, RANK = 24, 512, 8


@pytest.fixture(scope="module")
def weights():
    w, a, b = tc.make_weights(LAYERS, WIDTH, RANK)
    stacked = tc.LowRankUpdate(w, a, b)
    per_layer = [tc.LowRankUpdate(w[i], a[i], b[i]) for i in range(LAYERS)]
    return stacked, per_layer


def _compile(fn, *args):
    return jax.jit(lambda *a: fn(*a)).lower(*args).compile()


@pytest.mark.benchmark(group="trace+compile unrolled")
@pytest.mark.parametrize("kind", ["dense", "qkern"])
def test_trace_compile_unrolled(benchmark, weights, kind):
    _, per_layer = weights
    x = jnp.ones((1, WIDTH))
    if kind == "dense":
        args, fn = ([p.materialise() for p in per_layer], x), tc._mlp_unrolled
    else:
        args, fn = (per_layer, x), qkern.quaxify(tc._mlp_unrolled)
    benchmark.pedantic(_compile, args=(fn, *args), rounds=3, iterations=1)


@pytest.mark.benchmark(group="trace+compile scanned")
@pytest.mark.parametrize("kind", ["dense", "qkern"])
def test_trace_compile_scanned(benchmark, weights, kind):
    stacked, _ = weights
    x = jnp.ones((1, WIDTH))
    if kind == "dense":
        args, fn = (stacked.materialise(), x), tc._mlp_scanned
    else:
        args, fn = (stacked, x), qkern.quaxify(tc._mlp_scanned)
    benchmark.pedantic(_compile, args=(fn, *args), rounds=3, iterations=1)


@pytest.mark.benchmark(group="run time")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("kind", ["dense", "qkern"])
def test_run(benchmark, weights, kind, batch):
    _, per_layer = weights
    x = jnp.ones((batch, WIDTH))
    if kind == "dense":
        fn, w = jax.jit(tc._mlp_unrolled), [p.materialise() for p in per_layer]
    else:
        fn, w = jax.jit(qkern.quaxify(tc._mlp_unrolled)), per_layer
    jax.block_until_ready(fn(w, x))
    benchmark(lambda: jax.block_until_ready(fn(w, x)))
