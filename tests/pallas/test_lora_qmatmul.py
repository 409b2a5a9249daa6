"""The public fused QLoRA matmul, `qkern.pallas.lora_qmatmul.lora_qmatmul`, through every
backend (xla natively; triton and mosaic_tpu in interpret mode): values against
`reference`, both directions, leading batch dims, and its custom_vjp: gradients for x, u
and v equal jax.grad of the plain-jnp reference under jit, and the frozen quantised weight
gets a zero cotangent.

The helpers at the top (`lora_case`, `check_lora`) are shared with test_lora_triton.py and
test_lora_mosaic.py.
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

from .cases import assert_matches

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


# ---------------------------------------------------------------------------------------
# Values through each backend
# ---------------------------------------------------------------------------------------

_XLA = [("int8", {}, 1, 4), ("int4", dict(calibration="minmax"), 3, 12),
        ("fp8_e4m3", {}, 40, 12)]


@pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
@pytest.mark.parametrize("fmt,opts,m,r", _XLA,
                         ids=[f"{c[0]}{'-minmax' if c[1].get('calibration') else ''}"
                              f"{'-b128' if c[1].get('block_size') else ''}-m{c[2]}-r{c[3]}"
                              for c in _XLA])
def test_xla_backend(fmt, opts, m, r, transposed):
    dtype = jnp.bfloat16 if m in (3, 40) else jnp.float32
    x, op, u, v = lora_case(fmt, opts, m, 320, 200, r, dtype, transposed)
    f = jax.jit(lambda x, op, u, v: lora_qmatmul(x, op, u, v, SCALE, transposed=transposed,
                                                 backend="xla"))
    y = f(x, op, u, v)
    assert y.dtype == x.dtype
    assert_matches(y, ref(x, op, u, v, transposed=transposed)[0])


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_pallas_backends_through_the_public_api(backend):
    """Leading dims of x flatten into M; both directions; results equal the reference."""
    x, op, u, v = lora_case("nf4", {}, 6, 256, 136, 4, jnp.float32)
    xb = x.reshape(2, 3, 256)
    y = lora_qmatmul(xb, op, u, v, SCALE, backend=backend, interpret=True)
    assert y.shape == (2, 3, 136)
    assert_matches(y.reshape(6, 136), ref(x, op, u, v)[0])


def test_context_manager_selects_the_backend():
    x, op, u, v = lora_case("int4", {}, 2, 256, 128, 4, jnp.float32, transposed=True)
    with qkern.backend("xla"):
        y = lora_qmatmul(x, op, u, v, SCALE, transposed=True)
    assert_matches(y, ref(x, op, u, v, transposed=True)[0])


# ---------------------------------------------------------------------------------------
# Gradients (custom_vjp) against jax.grad of the reference, under jit
# ---------------------------------------------------------------------------------------

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


def _check_grads(backend, fmt, opts, m, k, n, r, dtype, transposed, interpret):
    x, op, u, v = lora_case(fmt, opts, m, k, n, r, dtype, transposed, seed=2)
    dout = k if transposed else n
    ct = jnp.asarray(np.random.default_rng(9).standard_normal((m, dout), np.float32))
    got, dop = _grads(lambda x, op, u, v: lora_qmatmul(
        x, op, u, v, SCALE, transposed=transposed, backend=backend, interpret=interpret),
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


@pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
@pytest.mark.parametrize("fmt,opts,dtype", [("nf4", {}, jnp.float32),
                                            ("int4", dict(calibration="minmax"), jnp.bfloat16)],
                         ids=["nf4-f32", "int4minmax-bf16"])
def test_xla_gradients(fmt, opts, dtype, transposed):
    _check_grads("xla", fmt, opts, 5, 320, 136, 12, dtype, transposed, None)


# The backward of the forward kernel is the transposed fused kernel (and vice versa), so
# each case below runs both kernels of its backend, compiled under jit in interpret mode.
_PALLAS_GRADS = [
    ("triton", "nf4", {}, 3, 256, 136, 12, jnp.float32, False),
    ("triton", "int8", dict(block_size=64), 20, 192, 72, 4, jnp.bfloat16, True),
    ("mosaic_tpu", "nf4", {}, 3, 256, 136, 12, jnp.float32, False),
    ("mosaic_tpu", "int4", dict(calibration="minmax"), 20, 256, 128, 4, jnp.float32, True),
]


@pytest.mark.parametrize("backend,fmt,opts,m,k,n,r,dtype,transposed", _PALLAS_GRADS,
                         ids=[f"{c[0]}-{c[1]}-m{c[3]}-{'T' if c[8] else 'fwd'}"
                              for c in _PALLAS_GRADS])
def test_pallas_gradients(backend, fmt, opts, m, k, n, r, dtype, transposed):
    _check_grads(backend, fmt, opts, m, k, n, r, dtype, transposed, True)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["xla", "triton", "mosaic_tpu"])
def test_bad_factor_shapes(backend):
    x, op, u, v = lora_case("int8", {}, 2, 128, 64, 4, jnp.float32)
    call = functools.partial(lora_qmatmul, backend=backend, interpret=True)
    with pytest.raises(ValueError, match=r"factors u \(128, 4\) and v \(5, 64\)"):
        call(x, op, u, jnp.zeros((5, 64)), SCALE)
    with pytest.raises(ValueError, match=r"factors u \(64, 4\)"):
        call(x, op, u[:64], v, SCALE)
    with pytest.raises(ValueError, match=r"x has 100 columns .* takes 128"):
        call(x[:, :100], op, u, v, SCALE)
    with pytest.raises(ValueError, match=r"takes 64"):              # transposed: x is [M, N]
        call(x, op, u, v, SCALE, transposed=True)
