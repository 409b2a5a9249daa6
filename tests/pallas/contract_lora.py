"""The contract of the fused QLoRA matmul, `qkern.pallas.lora_qmatmul.lora_qmatmul`
(`x @ W + scale * (x @ u) @ v` with W quantised): what every backend must do, stated
once, through the public entry point.

Every backend's test class subclasses `LoraContract` and so runs every test below with
`lora_qmatmul(..., backend=self.backend, interpret=self.interpret)`: values against
`reference` in both directions (per-channel, zero-point and float8 weights; float32 and
bfloat16 x; the decode and tiled M ranges; r = 4 and 12), leading batch dims, M = 0, the
custom_vjp's gradients for x, u and v against jax.grad of the plain-jnp reference under jit
(the backward runs the backend's fused kernel in the other direction) with a zero
cotangent for the frozen weight, and the factor checks every backend makes.

How to add a backend "mine":

    # tests/pallas/test_lora_mine.py
    from .contract_lora import LoraContract

    class TestMine(LoraContract):
        backend = "mine"
        interpret = True            # False where the tests run on its real device

        # ... then the backend's own tests: its fused kernel's (y, xu) for explicit
        # configs (`check_lora`), its planner, lowering for the real target, the configs
        # it refuses.

The helpers (`lora_case`, `ref`, `check_lora`, `check_grads`) serve those backend tests
too. This module holds no test of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas._operand import canonical_operand
from qkern.pallas.lora_qmatmul import lora_qmatmul, reference

from .contract_qmatmul import assert_matches

SCALE = 0.5


@functools.lru_cache(maxsize=None)
def _operand(fmt, opts, k, n, seed):
    w = np.random.default_rng(seed).standard_normal((k, n), np.float32)
    return jax.jit(lambda w: canonical_operand(qkern.quantize(w, fmt, **dict(opts))))(w)


def lora_case(fmt, opts, m, k, n, r, dtype, transposed=False, seed=0):
    """(x [M, din] dtype, op of W [K, N], u [din, r] f32, v [r, dout] f32).

    u ~ N(0, 1) and v ~ N(0, 1/r): with SCALE the LoRA term is as large as the base
    product, so an error in either shows at every tolerance. Operands are cached (both
    directions of a case share one) and the draws come from numpy: in interpret-mode
    tests the compiles, not the arithmetic, are the cost.
    """
    op = _operand(fmt, tuple(sorted(opts.items())), k, n, seed)
    din, dout = (n, k) if transposed else (k, n)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.standard_normal((m, din), np.float32)).astype(dtype)
    u = jnp.asarray(rng.standard_normal((din, r), np.float32))
    v = jnp.asarray(rng.standard_normal((r, dout), np.float32) / np.sqrt(r))
    return x, op, u, v


@functools.partial(jax.jit, static_argnames=("transposed",))
def ref(x, op, u, v, scale=SCALE, transposed=False):
    """The reference, jitted (one compile per shape; scale is traced)."""
    return reference(x, op, u, v, scale, transposed=transposed)


def check_lora(y, xu, x, op, u, v, transposed, scale=SCALE):
    """y and xu match the reference to x's dtype's tolerance, and the LoRA term is a
    visible part of y (so the check would catch a dropped or misplaced term)."""
    y_ref, xu_ref = ref(x, op, u, v, scale=scale, transposed=transposed)
    assert y.shape == y_ref.shape and xu.shape == xu_ref.shape
    assert_matches(y, y_ref)
    assert_matches(xu, xu_ref, dtype=x.dtype)
    base = ref(x, op, u, v, scale=0.0, transposed=transposed)[0].astype(jnp.float32)
    lora = float(jnp.max(jnp.abs(y_ref.astype(jnp.float32) - base)))
    assert lora > 0.1 * float(jnp.max(jnp.abs(base)))


def _grads(f, x, op, u, v, ct):
    """(dx, du, dv) of sum(f(...) * ct), and the cotangent of op, under jit."""
    def loss(x, op, u, v):
        return jnp.sum(f(x, op, u, v).astype(jnp.float32) * ct)

    @jax.jit
    def run(x, op, u, v):
        _, vjp = jax.vjp(loss, x, op, u, v)
        return vjp(jnp.ones((), jnp.float32))

    dx, dop, du, dv = run(x, op, u, v)
    return (dx, du, dv), dop


def check_grads(lora, fmt, opts, m, k, n, r, dtype, transposed):
    """dx, du, dv of `lora(x, op, u, v, transposed=...)` (lora_qmatmul on one backend, with
    SCALE) equal jax.grad of the reference, and the frozen weight's cotangent is zero."""
    x, op, u, v = lora_case(fmt, opts, m, k, n, r, dtype, transposed, seed=2)
    dout = k if transposed else n
    ct = jnp.asarray(np.random.default_rng(9).standard_normal((m, dout), np.float32))
    got, dop = _grads(lambda x, op, u, v: lora(x, op, u, v, transposed=transposed),
                      x, op, u, v, ct)
    want, _ = _grads(lambda x, op, u, v: reference(x, op, u, v, SCALE,
                                                   transposed=transposed)[0],
                     x, op, u, v, ct)
    for name, g, w in zip(("dx", "du", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_matches(g, w, dtype=dtype)
    # the frozen quantised weight: zero cotangent (float0 for its integer codes)
    for leaf in jax.tree_util.tree_leaves(dop):
        if leaf.dtype == jax.dtypes.float0:
            continue
        assert float(jnp.max(jnp.abs(leaf))) == 0.0
    assert dop.data.dtype == jax.dtypes.float0 or float(jnp.max(jnp.abs(dop.data))) == 0.0


# fmt, opts, M, r, dtype on W [320, 200] (K and N not multiples of the tiles): M = 1 and 3
# decode, M = 40 tiled
CASES = [("int8", {}, 1, 4, jnp.float32),
         ("int4", dict(calibration="minmax"), 3, 12, jnp.bfloat16),
         ("fp8_e4m3", {}, 40, 12, jnp.bfloat16)]
CASE_IDS = [f"{c[0]}{'-minmax' if c[1] else ''}-m{c[2]}-r{c[3]}-{jnp.dtype(c[4]).name}"
            for c in CASES]

# The backward of the forward kernel is the transposed fused kernel (and vice versa), so
# each case runs both kernels of the backend, compiled under jit:
# fmt, opts, m, k, n, r, dtype, transposed
GRADS = [("nf4", {}, 3, 256, 136, 12, jnp.float32, False),
         ("int4", dict(calibration="minmax"), 20, 256, 128, 4, jnp.bfloat16, True)]
GRAD_IDS = ["nf4-f32-m3-fwd", "int4minmax-bf16-m20-T"]


class LoraContract:
    """Subclass with `backend` and `interpret` set (see the module docstring)."""

    backend: str = ""
    interpret: bool | None = None

    def lora(self, x, op, u, v, scale=SCALE, **kw):
        return lora_qmatmul(x, op, u, v, scale, backend=self.backend,
                            interpret=self.interpret, **kw)

    @pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
    @pytest.mark.parametrize("fmt,opts,m,r,dtype", CASES, ids=CASE_IDS)
    def test_matches_reference(self, fmt, opts, m, r, dtype, transposed):
        x, op, u, v = lora_case(fmt, opts, m, 320, 200, r, dtype, transposed)
        f = jax.jit(lambda x, op, u, v: self.lora(x, op, u, v, transposed=transposed))
        y = f(x, op, u, v)
        assert y.dtype == x.dtype
        assert_matches(y, ref(x, op, u, v, transposed=transposed)[0])

    def test_leading_dims_flatten_into_m(self):
        x, op, u, v = lora_case("nf4", {}, 6, 256, 136, 4, jnp.float32)
        y = self.lora(x.reshape(2, 3, 256), op, u, v)
        assert y.shape == (2, 3, 136)
        assert_matches(y.reshape(6, 136), ref(x, op, u, v)[0])

    @pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
    def test_no_rows(self, transposed):
        """M = 0 (an empty batch) gives an empty result instead of a zero-row grid."""
        x, op, u, v = lora_case("int8", {}, 1, 256, 128, 4, jnp.bfloat16, transposed)
        y = self.lora(jnp.ones((0, 5, x.shape[1]), jnp.bfloat16), op, u, v,
                      transposed=transposed)
        assert y.shape == (0, 5, 256 if transposed else 128) and y.dtype == jnp.bfloat16

    @pytest.mark.parametrize("fmt,opts,m,k,n,r,dtype,transposed", GRADS, ids=GRAD_IDS)
    def test_gradients(self, fmt, opts, m, k, n, r, dtype, transposed):
        check_grads(self.lora, fmt, opts, m, k, n, r, dtype, transposed)

    def test_bad_factor_shapes(self):
        x, op, u, v = lora_case("int8", {}, 2, 128, 64, 4, jnp.float32)
        with pytest.raises(ValueError, match=r"factors u \(128, 4\) and v \(5, 64\)"):
            self.lora(x, op, u, jnp.zeros((5, 64)))
        with pytest.raises(ValueError, match=r"factors u \(64, 4\)"):
            self.lora(x, op, u[:64], v)
        with pytest.raises(ValueError, match=r"x has 100 columns .* takes 128"):
            self.lora(x[:, :100], op, u, v)
        with pytest.raises(ValueError, match=r"takes 64"):          # transposed: x is [M, N]
            self.lora(x, op, u, v, transposed=True)
