"""Mixed precision like dense JAX: `x @ q` has the dtype of `x @ qkern.dequantize(q)` under
jnp's promotion rules and at least its accuracy, and `preferred_element_type` is honoured
(dtype and accuracy), whatever the kernel behind it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

DN = (((1,), (0,)), ((), ()))
K, N = 256, 96


def case(fmt, x_dtype, w_dtype, m=4, act_fmt=None):
    kw, kx = jax.random.split(jax.random.PRNGKey(0))
    w = jax.random.normal(kw, (K, N), jnp.float32).astype(w_dtype)
    x = jax.random.normal(kx, (m, K), jnp.float32).astype(x_dtype)
    q = qkern.quantize(w, fmt, act_fmt=act_fmt)
    return x, q


def exact(x, q):
    """float64-free exact-enough reference: x and the codes times scales, all in float32."""
    w32 = dataclasses.replace(q, dtype=np.dtype(np.float32)).materialise()
    return jnp.dot(x.astype(jnp.float32), w32, precision=jax.lax.Precision.HIGHEST)


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


FORMS = {
    "matmul": lambda x, q: x @ q,
    "dot_general": lambda x, q: jax.lax.dot_general(x, q, DN),
    "einsum": lambda x, q: jnp.einsum("mk,kn->mn", x, q),
    "left": lambda x, q: (q.T @ x.T).T,
}
DT = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("x_dtype", DT, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: "w" + jnp.dtype(d).name)
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_dtype_and_accuracy_like_dense(form, x_dtype, w_dtype, fmt):
    x, q = case(fmt, x_dtype, w_dtype)
    fn = FORMS[form]
    y = jax.jit(qkern.quaxify(fn))(x, q)
    dense = fn(x, qkern.dequantize(q))
    assert y.dtype == dense.dtype, (y.dtype, dense.dtype)
    ref = exact(x, q)
    # as accurate as the dense product of the dequantised weight (which rounds the weight
    # to its dtype first), with room for summation order in the output dtype
    eps = float(jnp.finfo(y.dtype).eps)
    assert rel(y, ref) <= max(rel(dense, ref), 32 * eps), (rel(y, ref), rel(dense, ref))


def test_bf16_activations_against_f32_weights_compute_in_f32():
    """The case a user hit: bf16 x against a float32 QArray came back float32 with bf16
    accuracy (2.3e-3 relative) where the dense product gives 5e-7."""
    x, q = case("int8", jnp.bfloat16, jnp.float32, m=1)
    y = qkern.quaxify(lambda x, q: x @ q)(x, q)
    assert y.dtype == jnp.float32
    assert rel(y, exact(x, q)) < 1e-5


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3"])
@pytest.mark.parametrize("m", [1, 33])
def test_preferred_element_type_wider_is_honoured(fmt, m):
    x, q = case(fmt, jnp.bfloat16, jnp.bfloat16, m=m)
    f = qkern.quaxify(lambda x, q: jax.lax.dot_general(x, q, DN, preferred_element_type=jnp.float32))
    y = jax.jit(f)(x, q)
    assert y.dtype == jnp.float32
    assert rel(y, exact(x, q)) < 1e-5      # float32 accuracy, not bf16's (~2e-3)


def test_preferred_element_type_narrower_is_honoured():
    x, q = case("nf4", jnp.float32, jnp.float32)
    f = lambda x, q: jax.lax.dot_general(x, q, DN, preferred_element_type=jnp.bfloat16)
    y = qkern.quaxify(f)(x, q)
    assert y.dtype == f(x, qkern.dequantize(q)).dtype == jnp.bfloat16
    assert rel(y, exact(x, q)) < 1e-2


def test_w8a8_result_dtype_like_dense():
    x, q = case("int8", jnp.bfloat16, jnp.float32, act_fmt="int8")
    y = qkern.quaxify(lambda x, q: x @ q)(x, q)
    assert y.dtype == (x @ qkern.dequantize(q)).dtype == jnp.float32
    assert rel(y, exact(x, q)) < 2e-2      # int8 activations


def test_grad_dtype_follows_x():
    x, q = case("int8", jnp.bfloat16, jnp.float32)
    g = jax.grad(lambda x: jnp.sum(qkern.quaxify(lambda x, q: x @ q)(x, q)))(x)
    gd = jax.grad(lambda x: jnp.sum(x @ qkern.dequantize(q)))(x)
    assert g.dtype == gd.dtype == jnp.bfloat16
    assert rel(g, gd) < 1e-2


def lora_case(base, x_dtype, rank=8):
    kw, ka, kb, kx = jax.random.split(jax.random.PRNGKey(3), 4)
    w = jax.random.normal(kw, (K, N), jnp.float32)
    a = jax.random.normal(ka, (K, rank), jnp.float32) / 16
    b = jax.random.normal(kb, (rank, N), jnp.float32) / 4
    w = qkern.quantize(w, "nf4") if base == "nf4" else w
    x = jax.random.normal(kx, (3, K), jnp.float32).astype(x_dtype)
    return x, qkern.LoraArray(w, a, b, alpha=16.0)


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("form", ["matmul", "dot_general", "left"])
def test_lora_bf16_activations_against_f32_adapter(base, form):
    """The LoRA path promotes like dense JAX too (it computed in bf16 and cast afterwards)."""
    x, lw = lora_case(base, jnp.bfloat16)
    fn = FORMS[form]
    y = jax.jit(qkern.quaxify(fn))(x, lw)
    full = lw.materialise()
    assert y.dtype == fn(x, full).dtype == jnp.float32
    ref = jnp.dot(x.astype(jnp.float32), full, precision=jax.lax.Precision.HIGHEST)
    assert rel(y, ref) < 1e-5


def test_lora_preferred_element_type():
    x, lw = lora_case("nf4", jnp.bfloat16)
    lw = qkern.quaxify(lambda l: l.astype(jnp.bfloat16))(lw)
    f = qkern.quaxify(lambda x, l: jax.lax.dot_general(x, l, DN, preferred_element_type=jnp.float32))
    assert f(x, lw).dtype == jnp.float32
