"""The xla backend: numerics against the reference on the shared cases, in both directions,
under jit/vmap/grad, and its wiring into QArray's dot_general rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import MatmulConfig, qmatmul
from qkern.pallas._xla_qmatmul import qmatmul_t_xla, qmatmul_xla

from .cases import (DTYPES, FORMAT_IDS, FORMATS, SHAPES, assert_matches, make_case,
                    reference_matmul, reference_matmul_t)

EXTRA = [("int3", {}), ("mxfp4", {}), ("mxfp8", {}), ("nf4", dict(double_quant=True)),
         ("int8", dict(calibration="minmax")), ("fp8_e4m3", dict(block_size=64))]


@pytest.mark.parametrize("fmt,opts", FORMATS + EXTRA,
                         ids=FORMAT_IDS + [f"extra-{f}-{i}" for i, (f, _) in enumerate(EXTRA)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block_k", [64, 512])
def test_forward_and_transposed_match_reference(fmt, opts, shape, block_k):
    m, k, n = shape
    x, _, op = make_case(fmt, opts, m, k, n, jnp.float32)
    cfg = MatmulConfig(block_k=block_k)
    assert_matches(qmatmul_xla(x, op, cfg), reference_matmul(x, op))
    dy = jax.random.normal(jax.random.PRNGKey(3), (m, n), jnp.float32)
    assert_matches(qmatmul_t_xla(dy, op, cfg), reference_matmul_t(dy, op))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=FORMAT_IDS)
def test_dtypes(fmt, opts, dtype):
    x, _, op = make_case(fmt, opts, 3, 384, 200, dtype)
    y = qmatmul(x, op, backend="xla")
    assert y.dtype == dtype
    assert_matches(y, reference_matmul(x, op))


def test_jit_vmap_grad():
    x, qw, op = make_case("nf4", {}, 5, 320, 136, jnp.float32)
    f = jax.jit(lambda x, op: qmatmul(x, op, backend="xla"))
    assert_matches(f(x, op), reference_matmul(x, op))
    xs = jnp.stack([x, 2 * x])
    ys = jax.vmap(lambda x: qmatmul(x, op, backend="xla"))(xs)
    assert_matches(ys[1], reference_matmul(2 * x, op))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(qmatmul(x, op, backend="xla"))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(reference_matmul(x, op))))(x)
    assert_matches(g, g_ref)    # relative to max |g|: y's summation order moves cos(y)


def test_frozen_weight_gets_zero_gradient():
    x, qw, op = make_case("int8", {}, 2, 64, 32, jnp.float32)
    g = jax.grad(lambda op: jnp.sum(qmatmul(x, op, backend="xla")), allow_int=True)(op)
    assert float(jnp.max(jnp.abs(g.scales))) == 0.0


def test_leading_dims_and_errors():
    x, qw, op = make_case("int4", {}, 6, 256, 128, jnp.float32)
    y = qmatmul(x.reshape(2, 3, 256), op, backend="xla")
    assert y.shape == (2, 3, 128)
    assert_matches(y.reshape(6, 128), reference_matmul(x, op))
    with pytest.raises(ValueError, match="K is 256"):
        qmatmul(jnp.ones((2, 255)), op, backend="xla")
    with pytest.raises(ValueError, match="Unknown qkern backend"):
        qmatmul(x, op, backend="cuda-magic")


# -- wiring: QArray's dot_general rule -------------------------------------------------------
@pytest.mark.parametrize("expr", ["x @ w", "w.T @ x.T", "y @ w.T", "jnp.einsum('k,kn->n', x[0], w)",
                                  "jnp.dot(x.reshape(1, 2, 3, 320), w)"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3"])
def test_dot_general_layouts_use_kernel_and_match(expr, fmt):
    kw, kx = jax.random.split(jax.random.PRNGKey(0))
    w_dense = jax.random.normal(kw, (320, 136))
    qw = qkern.quantize(w_dense, fmt)
    d = qw.materialise()
    x = jax.random.normal(kx, (6, 320))
    y_in = jax.random.normal(kx, (6, 136))
    f = lambda x, y, w: eval(expr, {"jnp": jnp, "x": x, "y": y, "w": w})
    got = qkern.quaxify(f)(x, y_in, qw)
    want = f(x, y_in, d)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The kernel path never materialises the whole dequantised weight: no [320, 136] float
    # value appears in the jaxpr.
    jaxpr = jax.make_jaxpr(qkern.quaxify(f))(x, y_in, qw)
    shapes = {tuple(v.aval.shape) for e in _all_eqns(jaxpr.jaxpr) for v in e.outvars}
    assert (320, 136) not in shapes and (136, 320) not in shapes


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for j in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(j, "jaxpr", None)
                if isinstance(j, jax.extend.core.Jaxpr):
                    yield from _all_eqns(j)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _all_eqns(inner)


def test_batched_layout_falls_back_correctly():
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 64))
    qw = qkern.quantize(w, "int8")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 128))
    got = qkern.quaxify(lambda x, w: jnp.einsum("bik,bkn->bin", x, w))(x, qw)
    want = jnp.einsum("bik,bkn->bin", x, qw.materialise())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grad_through_quaxified_layers():
    ws = [qkern.quantize(jax.random.normal(jax.random.PRNGKey(i), (64, 64)) / 8, "nf4")
          for i in range(3)]
    x = jax.random.normal(jax.random.PRNGKey(9), (4, 64))

    def model(x, ws):
        for w in ws:
            x = jnp.tanh(x @ w)
        return jnp.sum(x ** 2)

    g = jax.jit(jax.grad(qkern.quaxify(model)))(x, ws)
    g_ref = jax.grad(model)(x, [w.materialise() for w in ws])
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
