"""One float8 decoder for every backend: all 256 codes, NaN and inf included.

Regression: the Triton kernel's bit decoder (GPUs below sm_89) turned non-finite codes into
large finite values while the Mosaic one gave NaN/inf; a weight holding such a code then
gave a finite product on one backend and NaN on another. Both now use
`qkern.pallas._decode.fp8_from_bits`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkern.pallas.qmatmul import _triton as tq
from qkern.pallas import qmatmul
from qkern.pallas._config import MatmulConfig
from qkern.pallas._decode import fp8_from_bits
from .contract_qmatmul import make_case, reference_matmul

FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_from_bits_is_astype_on_every_code(fmt):
    dt = FP8[fmt]
    bits = jnp.arange(256, dtype=jnp.int32)
    got = np.asarray(jax.jit(lambda b: fp8_from_bits(b, dt))(bits))
    want = np.asarray(jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), dt)
                      .astype(jnp.float32))
    np.testing.assert_array_equal(got, want)                  # NaN == NaN, inf == inf
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def _weight_with_every_code(fmt):
    """An fp8 QOperand [K=256, N=256] of finite codes, except that column j holds code j in
    row 0: column j of x @ W is non-finite exactly when code j is."""
    x, _, op = make_case(fmt, {}, 3, 256, 256, jnp.float32, seed=4)
    codes = np.asarray(jax.lax.bitcast_convert_type(op.data, jnp.uint8)).copy()
    finite = np.isfinite(np.asarray(op.data.astype(jnp.float32)))
    assert finite.all()
    codes[0, :] = np.arange(256, dtype=np.uint8)
    data = jax.lax.bitcast_convert_type(jnp.asarray(codes), op.data.dtype)
    return x, dataclasses.replace(op, data=data)


BACKENDS = ["xla", "triton", "triton_bits", "mosaic_tpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", list(FP8))
def test_every_fp8_code_gives_the_same_product_on_every_backend(fmt, backend, request):
    x, op = _weight_with_every_code(fmt)
    want = np.asarray(reference_matmul(x, op))
    if backend == "triton_bits":           # the arithmetic decoder of GPUs below sm_89
        request.getfixturevalue("fp8_bits")
        assert tq._plan(op, 3, MatmulConfig(block_m=16, block_n=64, block_k=64),
                        transposed=False).fp8_bits
    name = "triton" if backend == "triton_bits" else backend
    got = np.asarray(qmatmul(x, op, backend=name, interpret=name != "xla"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    ok = np.isfinite(want)
    assert (~ok).any() and ok.any()
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-4, atol=1e-3)
