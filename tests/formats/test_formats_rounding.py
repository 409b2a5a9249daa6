"""Float element rounding (fp8, fp4 and the MX formats) is exact round-to-nearest-even.

Regression: on jax 0.12 XLA's CPU backend, inside GPTQ's fused loop, converted float32 to
fp4 through a wider float: 3.4995 became 3.5, then 4.0 (e2m1) instead of 3.0. And
`jnp.exp2` is inexact on that backend (2**13 = 8192.0039), which MX scales went through.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qkern
from qkern.formats._quantize import round_to_float

DTYPES = [jnp.float4_e2m1fn, jnp.float8_e4m3fn, jnp.float8_e5m2]


def _values(dt) -> np.ndarray:
    """Every finite value of `dt`, the midpoints between neighbours, and one float32 ulp
    either side of each midpoint (the cases a double rounding gets wrong)."""
    bits = 4 if jnp.dtype(dt).itemsize == 1 and "float4" in jnp.dtype(dt).name else 8
    codes = np.arange(2 ** bits, dtype=np.uint8)
    if bits == 4:
        vals = codes.astype(ml_dtypes.uint4).view(dt).astype(np.float32)
    else:
        vals = codes.view(dt).astype(np.float32)
    vals = np.unique(vals[np.isfinite(vals)])
    mids = ((vals[1:].astype(np.float64) + vals[:-1]) / 2).astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(-np.inf))])
    return np.concatenate([vals, near]).astype(np.float32)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_round_to_float_matches_ml_dtypes_at_ties_and_next_to_them(dt):
    x = _values(dt)
    want = x.astype(dt).astype(np.float32)          # ml_dtypes: round-half-even, one step
    f = jax.jit(lambda x: jax.lax.fori_loop(   # inside a loop, as GPTQ runs it
        0, 1, lambda i, c: round_to_float(x * jnp.float32(1.0), dt).astype(jnp.float32), x))
    np.testing.assert_array_equal(np.asarray(f(x)), want)
    np.testing.assert_array_equal(np.asarray(round_to_float(x, dt)).astype(np.float32), want)


def test_round_to_float_clips_to_the_largest_finite_value():
    big = np.array([1e9, -1e9, 7.0, -6.5], np.float32)
    got = np.asarray(round_to_float(big, jnp.float4_e2m1fn)).astype(np.float32)
    np.testing.assert_array_equal(got, [6.0, -6.0, 6.0, -6.0])


def test_mx_scales_are_exact_powers_of_two():
    w = jax.random.normal(jax.random.key(0), (128, 8)) * jnp.logspace(-3, 4, 8)
    q = qkern.quantize(w, "mxfp8")
    from qkern.formats import get_format
    from qkern.formats._quantize import dequantize_scales
    s = np.asarray(dequantize_scales(q.scales, None, None, get_format("mxfp8")), np.float32)
    want = np.ldexp(np.float32(1), np.asarray(q.scales).astype(np.int32) - 127).astype(np.float32)
    np.testing.assert_array_equal(s, want)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_scale_exponent_of_a_power_of_two_is_exact(fmt):
    """A block whose largest value is 2**k keeps it exactly (the OCP exponent floor(log2
    amax) - emax): XLA's log2(2**13) is just below 13 on a CPU, which stored 2**12 and
    clipped 8192 to 7168 (mxfp8) or 6144 (mxfp4)."""
    ks = np.arange(-100, 128)
    col = (2.0 ** ks).astype(np.float32)
    w = np.tile(col * 0.3, (32, 1))
    w[0] = col                                             # each column: one block of 32
    d = np.asarray(qkern.dequantize(qkern.quantize(jnp.asarray(w), fmt)))
    np.testing.assert_array_equal(d[0], col)
