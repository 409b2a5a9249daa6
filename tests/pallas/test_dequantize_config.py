"""`MatmulConfig(dequantize=True)`: dequantise-then-dot instead of the kernel, on every
backend (the large-M fallback the autotuner may choose), and what it takes to choose it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.autotune import _space
from qkern.pallas import qmatmul
from qkern.pallas._config import DECODE_M, MatmulConfig, Problem
from qkern.pallas._operand import reference_dequantize, stored_operand

BACKENDS = [("xla", False), ("triton", True), ("mosaic_tpu", True)]


def _case(fmt, k=96, n=256, m=40, dtype=jnp.float32, **kw):
    w = jax.random.normal(jax.random.key(0), (k, n))
    op = stored_operand(qkern.quantize(w, fmt, **kw))
    x = jax.random.normal(jax.random.key(1), (m, k)).astype(dtype)
    return x, op


@pytest.mark.parametrize("backend,interpret", BACKENDS)
@pytest.mark.parametrize("fmt,kw", [("int8", {}), ("nf4", {"block_size": 32}),
                                    ("int4", {"calibration": "minmax", "block_size": 32})])
def test_dequantize_config_equals_dequantised_dot_forward_and_grad(backend, interpret, fmt, kw):
    x, op = _case(fmt, **kw)
    cfg = MatmulConfig(dequantize=True)
    w = reference_dequantize(op)
    f = jax.jit(lambda x: qmatmul(x, op, backend=backend, config=cfg, interpret=interpret))
    np.testing.assert_allclose(f(x), x @ w, rtol=1e-5, atol=1e-4)
    dy = jax.random.normal(jax.random.key(2), (x.shape[0], op.n))
    dx = jax.grad(lambda x: jnp.vdot(f(x), dy))(x)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5, atol=1e-4)
    yt = qmatmul(dy, op, transposed=True, backend=backend, config=cfg, interpret=interpret)
    np.testing.assert_allclose(yt, dy @ w.T, rtol=1e-5, atol=1e-4)


def test_dequantize_config_runs_no_kernel_and_keeps_x_dtype():
    x, op = _case("nf4", dtype=jnp.bfloat16, block_size=32)
    jaxpr = jax.make_jaxpr(lambda x: qmatmul(x, op, backend="triton", interpret=True,
                                             config=MatmulConfig(dequantize=True)))(x)
    text = str(jaxpr)
    assert "pallas_call" not in text and "dot_general" in text
    kernel = str(jax.make_jaxpr(lambda x: qmatmul(x, op, backend="triton", interpret=True))(x))
    assert "pallas_call" in kernel                  # the spy can fail: the default is the kernel
    y = qmatmul(x, op, config=MatmulConfig(dequantize=True), backend="xla")
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_dequantize_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="dequantize must be True or False"):
        MatmulConfig(dequantize=bad)


def test_block_fields_still_refuse_bools():
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        MatmulConfig(block_k=True)


@pytest.mark.parametrize("backend", ["xla", "triton", "mosaic_tpu"])
def test_autotune_times_dequantize_for_prefill_only(backend):
    _, op = _case("int8", k=256, n=256)
    prob = lambda m: Problem(backend, "qmatmul", m, 256, 256, "bfloat16", "int8",  # noqa: E731
                             op.block_size, False)
    prefill, _ = _space.candidates(prob(DECODE_M + 1), op)
    decode, _ = _space.candidates(prob(DECODE_M), op)
    assert sum(c.dequantize for c in prefill) == 1
    assert not any(c.dequantize for c in decode)
    off, _ = _space.candidates(prob(256), op, space={"dequantize": (False,)})
    assert not any(c.dequantize for c in off)


def test_a_cached_dequantize_winner_reaches_qmatmul(monkeypatch):
    from qkern.autotune import _cache

    monkeypatch.setenv("QKERN_NATIVE", "0")   # the scan, not the native GEMM, on large weights

    x, op = _case("int8", m=128)
    monkeypatch.setattr(_cache, "lookup", lambda problem: MatmulConfig(dequantize=True))
    text = str(jax.make_jaxpr(lambda x: qmatmul(x, op, backend="xla"))(x))
    assert "scan" not in text and "dot_general" in text
    monkeypatch.setattr(_cache, "lookup", lambda problem: None)
    # nothing cached: the heuristic, which dequantises this small weight at M = 128 ...
    assert "scan" not in str(jax.make_jaxpr(lambda x: qmatmul(x, op, backend="xla"))(x))
    from qkern.pallas import _config      # ... and runs the scan where weights count as large
    monkeypatch.setattr(_config, "SMALL_WEIGHT_BYTES", 0)
    assert "scan" in str(jax.make_jaxpr(lambda x: qmatmul(x, op, backend="xla"))(x))
