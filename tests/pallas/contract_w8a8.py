"""The contract of W8A8, `qkern.pallas.w8a8.w8a8_matmul` (int8 activations times an int8
weight, int32 accumulation): what every backend must do, stated once, through the public
entry point.

Every backend's test class subclasses `W8A8Contract` and so runs every test below with
`w8a8_matmul(..., backend=self.backend, interpret=self.interpret)`: numerics against
`w8a8_reference` on each shared shape (every dtype, per-channel and per-block scales,
dynamic and static activation scales), jit and vmap with a traced act_scale, leading batch
dims, M = 0, the straight-through gradient (run by the backend's transposed weight-only
kernel), and the input every backend refuses with the same error.

How to add a backend "mine":

    # tests/pallas/test_w8a8_mine.py
    from .contract_w8a8 import W8A8Contract

    class TestMine(W8A8Contract):
        backend = "mine"
        interpret = True            # False where the tests run on its real device

        # ... then the backend's own tests: the planner's choices for explicit configs,
        # lowering for the real target, the configs and scale layouts it refuses.

Operands are built directly from random int8 codes and float32 scales (`int8_operand`)
rather than through `qkern.quantize`: every backend sees exactly the same QOperand, and
each new weight shape costs no quantiser compile (interpret mode is slow enough). The
stored rows past K (the padding of the last block) hold random codes, not zeros, so a
kernel that fails to zero its x padding shows up. test_w8a8_xla.py checks real
`qkern.quantize` operands too. This module holds no test of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkern.formats import get_format
from qkern.pallas._operand import QOperand
from qkern.pallas.w8a8 import w8a8_matmul
from qkern.pallas.w8a8.base import w8a8_reference

from .contract_qmatmul import assert_matches, reference_matmul

# weight scale layouts W8A8 takes: block size along K (None: one block, per channel)
LAYOUTS = {"per-channel": None, "block128": 128, "block64": 64}


def int8_operand(k: int, n: int, block: int | None = None, seed: int = 0) -> QOperand:
    """A symmetric int8 QOperand of a [k, n] weight with `block` rows per scale."""
    rng = np.random.default_rng(seed)
    b = k if block is None else block
    nb = -(-k // b)
    data = rng.integers(-127, 128, (nb * b, n), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, (nb, n)) / 127).astype(np.float32)
    return QOperand(jnp.asarray(data), jnp.asarray(scales), None, get_format("int8"), b, k)


def activation(m: int, k: int, dtype, seed: int = 1):
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    x[:, ::7] *= 4.0                                 # rows with a spread of magnitudes
    return jnp.asarray(x).astype(dtype)


ref = jax.jit(w8a8_reference)

# The shared shapes (contract_qmatmul.SHAPES), each dtype, both scale layouts every backend
# takes, dynamic and static activation scales:
# (m, k, n), dtype, weight block (None: per channel), act_scale
CASES = {
    "1x512x256-f32-per-channel-dynamic": ((1, 512, 256), jnp.float32, None, None),
    "3x384x200-bf16-block128-static": ((3, 384, 200), jnp.bfloat16, 128, 0.02),
    "16x1000x136-f16-block128-dynamic": ((16, 1000, 136), jnp.float16, 128, None),
    "257x320x260-f32-per-channel-static": ((257, 320, 260), jnp.float32, None, 0.05),
}


class W8A8Contract:
    """Subclass with `backend` and `interpret` set (see the module docstring)."""

    backend: str = ""
    interpret: bool | None = None

    def mm(self, x, op, **kw):
        return w8a8_matmul(x, op, backend=self.backend, interpret=self.interpret, **kw)

    # -- numerics ---------------------------------------------------------------------

    @pytest.mark.parametrize("case", list(CASES))
    def test_matches_reference(self, case):
        (m, k, n), dtype, block, act_scale = CASES[case]
        x, op = activation(m, k, dtype), int8_operand(k, n, block)
        s = None if act_scale is None else jnp.float32(act_scale)
        y = self.mm(x, op, act_scale=s)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_matches(y, ref(x, op, s))

    def test_jit_vmap_and_a_traced_act_scale(self):
        """A batch of x through the batching rule, a traced static scale per element."""
        op = int8_operand(640, 72, 128)
        xs = jnp.stack([activation(40, 640, jnp.bfloat16, seed) for seed in (1, 2)])
        scales = jnp.array([0.02, 0.03], jnp.float32)
        f = jax.jit(jax.vmap(lambda x, s, op: self.mm(x, op, act_scale=s),
                             in_axes=(0, 0, None)))
        ys = f(xs, scales, op)
        for b in range(2):
            assert_matches(ys[b], ref(xs[b], op, scales[b]))

    def test_leading_dims_flatten_into_m(self):
        x, op = activation(6, 256, jnp.bfloat16), int8_operand(256, 64, 128)
        y = jax.jit(lambda x, op: self.mm(x, op))(x.reshape(2, 3, 256), op)
        assert y.shape == (2, 3, 64)
        assert_matches(y.reshape(6, 64), ref(x, op))

    def test_no_rows(self):
        """M = 0 (an empty batch) gives an empty result instead of a zero-row grid."""
        y = self.mm(jnp.ones((0, 4, 256), jnp.bfloat16), int8_operand(256, 64))
        assert y.shape == (0, 4, 64) and y.dtype == jnp.bfloat16

    @pytest.mark.parametrize("act_scale", [None, 0.05], ids=["dynamic", "static"])
    def test_grad_is_straight_through(self, act_scale):
        """d/dx is dy @ W.T (the activation rounding is the identity), from the backend's
        transposed weight-only kernel."""
        x, op = activation(3, 256, jnp.float32), int8_operand(256, 64, 128)
        loss = lambda x: jnp.sum(self.mm(x, op, act_scale=act_scale) ** 2)  # noqa: E731
        g = jax.jit(jax.grad(loss))(x)
        y = self.mm(x, op, act_scale=act_scale)
        g_ref = jax.vjp(lambda x: reference_matmul(x, op), x)[1](2 * y)[0]
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)

    # -- bad input (the same error on every backend) -----------------------------------

    def test_rejects_weights_that_are_not_symmetric_int8(self):
        op = int8_operand(256, 64, 128)
        x = jnp.ones((1, 256))
        int4 = dataclasses.replace(op, data=op.data[:128].astype(jnp.uint8),
                                   fmt=get_format("int4"))
        with pytest.raises(ValueError, match="symmetric int8 weight; got int4"):
            self.mm(x, int4)
        minmax = dataclasses.replace(op, zeros=jnp.zeros(op.scales.shape, jnp.int8))
        with pytest.raises(ValueError, match="got int8 with zero points"):
            self.mm(x, minmax)
        with pytest.raises(ValueError, match="int8 weight codes; got data of dtype int32"):
            self.mm(x, dataclasses.replace(op, data=op.data.astype(jnp.int32)))
        with pytest.raises(TypeError, match="QOperand"):
            self.mm(x, jnp.ones((256, 64), jnp.int8))

    def test_rejects_wrong_k_and_non_float_x(self):
        op = int8_operand(256, 64)
        with pytest.raises(ValueError, match=r"x has 255 columns but the weight's K is 256"):
            self.mm(jnp.ones((2, 255)), op)
        with pytest.raises(ValueError, match=r"K is 256"):
            self.mm(jnp.ones((2, 3, 255)), op)
        with pytest.raises(ValueError, match="floating point"):
            self.mm(jnp.ones((2, 256), jnp.int32), op)

    @pytest.mark.parametrize("bad,err,match", [
        (jnp.ones((1,), jnp.float32), ValueError, r"scalar .* got shape \(1,\)"),
        (jnp.ones((2, 3), jnp.float32), ValueError, r"got shape \(2, 3\)"),
        (jnp.int32(2), TypeError, r"floating-point scalar; got dtype int32"),
        ("0.1", TypeError, r"scalar float array or None; got str"),
        (True, TypeError, r"bool"),
    ], ids=["shape1", "shape2x3", "int32", "str", "bool"])
    def test_rejects_non_scalar_act_scale(self, bad, err, match):
        with pytest.raises(err, match=match):
            self.mm(jnp.ones((1, 256)), int8_operand(256, 64), act_scale=bad)
