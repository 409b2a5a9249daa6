"""Shared cases for every quantised-matmul backend's tests (each backend's test module
imports these, so all backends are held to the same shapes, formats and tolerances)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import qkern
from qkern.pallas._operand import canonical_operand, reference_dequantize

# (format, quantize options)
FORMATS = [
    ("int8", {}),
    ("int8", dict(block_size=128)),
    ("int4", {}),
    ("int4", dict(calibration="minmax")),
    ("nf4", {}),
    ("fp4", {}),
    ("fp8_e4m3", {}),
    ("fp8_e5m2", dict(block_size=128)),
]
FORMAT_IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in FORMATS]

# (M, K, N): M = 1, 3, 16, 257 and K, N that are not multiples of the block sizes
SHAPES = [(1, 512, 256), (3, 384, 200), (16, 1000, 136), (257, 320, 260)]

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# Relative (to max |reference|) tolerance by activation dtype.
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 4e-3}


def make_case(fmt, opts, m, k, n, dtype, seed=0):
    """(x [M, K] dtype, QArray [K, N], QOperand)."""
    kw, kx = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(kw, (k, n), jnp.float32)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    qw = qkern.quantize(w, fmt, **opts)
    return x, qw, canonical_operand(qw)


def reference_matmul(x, op):
    """x @ dequant(W), float32 accumulation, in x's dtype."""
    y = jnp.dot(x.astype(jnp.float32), reference_dequantize(op),
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def reference_matmul_t(dy, op):
    """dy [M, N] @ dequant(W).T -> [M, K]."""
    y = jnp.dot(dy.astype(jnp.float32), reference_dequantize(op).T,
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(dy.dtype)


def assert_matches(got, want, dtype=None):
    """Max error relative to max |want|, within the tolerance of `dtype` (default: want's)."""
    tol = TOL[jnp.dtype(dtype if dtype is not None else want.dtype)]
    assert jnp.dtype(got.dtype) == jnp.dtype(want.dtype), (got.dtype, want.dtype)
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.max(np.abs(want))), 1.0)
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= tol, f"max relative error {err:.3g} > {tol:.3g}"
