"""LoraArray: construction, the forward matmul in every layout, and gradients against the
materialised dense reference, for dense and quantised (nf4) bases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.types.lora import LoraArray

from .conftest import make_lora

lax = jax.lax


def _bases(w, kind):
    return w if kind == "dense" else qkern.quantize(w, "nf4")


def _dense(base):
    return qkern.dequantize(base) if isinstance(base, qkern.QArray) else base


# -- construction -------------------------------------------------------------------------
def test_init_starts_at_the_base_and_scales_a(keys):
    w = jax.random.normal(keys[0], (256, 96))
    lw = LoraArray.init(w, 8, keys[1])
    assert lw.a.shape == (256, 8) and lw.b.shape == (8, 96)
    assert not np.any(lw.b)
    assert lw.alpha == 8.0 and lw.scale == 1.0
    assert 0.5 / 16 < float(jnp.std(lw.a)) < 2.0 / 16          # N(0, 1/in): std 1/16
    np.testing.assert_array_equal(lw.materialise(), w)
    q = LoraArray.init(qkern.quantize(w, "nf4"), 4, keys[1], alpha=16)
    assert q.a.dtype == jnp.float32 and q.scale == 4.0 and q.shape == (256, 96)


@pytest.mark.parametrize("rank", [0, -1, 97])
def test_rank_out_of_range_is_an_error(keys, rank):
    w = jnp.ones((128, 96))
    with pytest.raises(ValueError, match="rank"):
        LoraArray.init(w, rank, keys[0])
    if rank > 0:
        with pytest.raises(ValueError, match="rank 97"):
            LoraArray(w, jnp.ones((128, rank)), jnp.ones((rank, 96)))


@pytest.mark.parametrize("a_shape,b_shape", [((128, 4), (5, 96)), ((127, 4), (4, 96)),
                                             ((128, 4), (4, 95)), ((2, 128, 4), (2, 4, 96))])
def test_shape_mismatch_is_an_error(a_shape, b_shape):
    with pytest.raises(ValueError, match="LoraArray"):
        LoraArray(jnp.ones((128, 96)), jnp.ones(a_shape), jnp.ones(b_shape))


def test_bad_field_types_are_errors():
    with pytest.raises(TypeError, match="a must be floating"):
        LoraArray(jnp.ones((8, 8)), jnp.ones((8, 2), jnp.int32), jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="alpha"):
        LoraArray(jnp.ones((8, 8)), jnp.ones((8, 2)), jnp.ones((2, 8)), alpha=jnp.float32(2))
    with pytest.raises(ValueError, match="rank >= 2"):
        LoraArray(jnp.ones((8,)), jnp.ones((8, 2)), jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="rank must be an int"):
        LoraArray.init(jnp.ones((8, 8)), 2.0, jax.random.PRNGKey(0))


# -- forward ------------------------------------------------------------------------------
LAYOUTS = {
    # name: (fn(x, w), x shape for w [K=160, N=96])
    "x@w": (lambda x, w: x @ w, (5, 160)),
    "x@w M=1": (lambda x, w: x @ w, (1, 160)),
    "x3d@w": (lambda x, w: jnp.einsum("bsk,kn->bsn", x, w), (2, 3, 160)),
    "x@w.T": (lambda x, w: x @ w.T, (4, 96)),
    "w.T@x.T": (lambda x, w: w.T @ x.T, (3, 160)),
    "w@x.T": (lambda x, w: w @ x.T, (3, 96)),
    "dot_general x-contract-0": (
        lambda x, w: lax.dot_general(x, w, (((0,), (0,)), ((), ()))), (160, 7)),
}


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_layouts_match_the_materialised_weight(keys, kind, layout, dtype):
    fn, xshape = LAYOUTS[layout]
    w = jax.random.normal(keys[0], (160, 96), dtype)
    lw = make_lora(_bases(w, kind), 160, 96, 6, keys[1], alpha=12.0)
    x = jax.random.normal(keys[2], xshape, dtype)
    got = jax.jit(qkern.quaxify(fn))(x, lw)
    want = fn(x.astype(jnp.float32), lw.materialise().astype(jnp.float32))
    assert got.dtype == dtype and got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want)))
    tol = 1e-2 * scale if dtype == jnp.bfloat16 else 2e-5 * scale
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=tol)


def _dot_output_shapes(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.extend(tuple(v.aval.shape) for v in eqn.outvars)
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                out.extend(_dot_output_shapes(inner))
            elif hasattr(p, "eqns"):
                out.extend(_dot_output_shapes(p))
    return out


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_the_low_rank_product_is_never_formed(keys, kind):
    """No dot_general produces the [K, N] product a @ b: only [M, r] and [M, N] results."""
    w = jax.random.normal(keys[0], (256, 128))
    lw = make_lora(_bases(w, kind), 256, 128, 4, keys[1])
    jaxpr = jax.make_jaxpr(qkern.quaxify(lambda x, w: x @ w))(jnp.ones((2, 256)), lw)
    shapes = _dot_output_shapes(jaxpr.jaxpr)
    assert shapes and (256, 128) not in shapes and (2, 4) in shapes
    # ...whereas materialising does form it (so the check can fail).
    jaxpr = jax.make_jaxpr(lambda x, w: x @ w.materialise())(jnp.ones((2, 256)), lw)
    assert (256, 128) in _dot_output_shapes(jaxpr.jaxpr)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_batch_dimensions_over_leading_axes(keys, kind):
    w = jax.random.normal(keys[0], (3, 128, 64))
    base = w if kind == "dense" else qkern.quantize(w, "nf4")
    lw = make_lora(base, 128, 64, 4, keys[1], lead=(3,))
    x = jax.random.normal(keys[2], (3, 5, 128))
    for fn in (lambda x, w: jnp.einsum("bmk,bkn->bmn", x, w),
               lambda x, w: jnp.einsum("bkn,bmk->bnm", w, x),
               lambda x, w: jnp.einsum("bmn,bkn->bmk", x[..., :64], w)):
        got = qkern.quaxify(fn)(x, lw)
        np.testing.assert_allclose(got, fn(x, lw.materialise()), rtol=2e-4, atol=2e-4)


def test_matmul_with_a_leading_axis_that_is_not_a_batch_axis_materialises(keys):
    w = jax.random.normal(keys[0], (2, 64, 32))
    lw = make_lora(w, 64, 32, 4, keys[1], lead=(2,))
    x = jax.random.normal(keys[2], (5, 64))
    fn = lambda x, w: jnp.einsum("mk,lkn->mln", x, w)  # noqa: E731
    np.testing.assert_allclose(qkern.quaxify(fn)(x, lw), fn(x, lw.materialise()),
                               rtol=2e-4, atol=2e-4)


# -- rules that keep the low-rank form ----------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_transpose_and_cast_keep_a_lora_array(keys, kind):
    w = jax.random.normal(keys[0], (128, 64))
    lw = make_lora(_bases(w, kind), 128, 64, 4, keys[1])
    t = qkern.quaxify(lambda w: w.T)(lw)
    assert isinstance(t, LoraArray) and t.shape == (64, 128)
    seen = []

    def probe(w):
        seen.append((type(w.T.value), type(w.astype(jnp.bfloat16).value)))
        return (w.T @ jnp.ones((128,))).sum()

    qkern.quaxify(probe)(lw)
    assert seen == [(LoraArray, LoraArray)]
    np.testing.assert_allclose(t.materialise(), lw.materialise().T, rtol=1e-6, atol=1e-6)
    x = jnp.ones((3, 128), jnp.bfloat16)
    y = qkern.quaxify(lambda x, w: x @ w.astype(jnp.bfloat16))(x, lw)
    assert y.dtype == jnp.bfloat16


def test_other_operations_materialise_with_the_base_frozen(keys):
    w = jax.random.normal(keys[0], (32, 16))
    lw = make_lora(w, 32, 16, 2, keys[1])
    got = qkern.quaxify(lambda w: jnp.tanh(w) + w[1:3].sum())(lw)
    m = lw.materialise()
    np.testing.assert_allclose(got, jnp.tanh(m) + m[1:3].sum(), rtol=1e-6)
    g = jax.grad(lambda w: qkern.quaxify(lambda w: jnp.sum(jnp.tanh(w)))(
        LoraArray(w, lw.a, lw.b, lw.alpha)))(w)
    assert not np.any(g)


# -- gradients -----------------------------------------------------------------------------
def _grad_pair(fn, base, a, b, alpha, x):
    """Gradients wrt (a, b, x) through the LoraArray and through the dense reference."""
    wd = _dense(base).astype(jnp.float32)
    s = alpha / a.shape[-1]

    def lora_loss(a, b, x):
        return jnp.sum(jnp.sin(qkern.quaxify(fn)(x, LoraArray(base, a, b, alpha=alpha))))

    def ref_loss(a, b, x):
        return jnp.sum(jnp.sin(fn(x, wd + s * jnp.matmul(a, b))))

    return (jax.jit(jax.grad(lora_loss, argnums=(0, 1, 2)))(a, b, x),
            jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(a, b, x))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("layout", ["x@w", "x@w.T", "w.T@x.T", "w@x.T", "x3d@w"])
def test_gradients_of_a_b_and_x_match_the_dense_reference(keys, kind, layout):
    fn, xshape = LAYOUTS[layout]
    w = jax.random.normal(keys[0], (160, 96))
    lw = make_lora(_bases(w, kind), 160, 96, 6, keys[1], alpha=3.0)
    x = jax.random.normal(keys[2], xshape)
    got, want = _grad_pair(fn, lw.w, lw.a, lw.b, lw.alpha, x)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)
        assert np.any(np.asarray(r))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_gradients_with_batch_dimensions(keys, kind):
    w = jax.random.normal(keys[0], (2, 128, 64))
    base = w if kind == "dense" else qkern.quantize(w, "nf4")
    lw = make_lora(base, 128, 64, 4, keys[1], lead=(2,))
    x = jax.random.normal(keys[2], (2, 3, 128))
    fn = lambda x, w: jnp.einsum("bmk,bkn->bmn", x, w)  # noqa: E731
    got, want = _grad_pair(fn, base, lw.a, lw.b, lw.alpha, x)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)


def test_the_dense_base_gets_no_gradient(keys):
    w = jax.random.normal(keys[0], (64, 32))
    lw = make_lora(w, 64, 32, 4, keys[1])
    x = jax.random.normal(keys[2], (3, 64))
    g = jax.grad(lambda lw: qkern.quaxify(lambda x, w: jnp.sum(x @ w))(x, lw))(lw)
    assert isinstance(g, LoraArray) and not np.any(g.w) and np.any(g.a) and np.any(g.b)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_gradients_through_stacked_qlora_layers(keys, fmt):
    """Four layers: the x-gradient runs through the quantised kernel of every layer above."""
    depth, width = 4, 128
    ws = [jax.random.normal(k, (width, width)) / width ** 0.5 for k in jax.random.split(keys[0], depth)]
    layers = [make_lora(qkern.quantize(w, fmt), width, width, 4, k)
              for w, k in zip(ws, jax.random.split(keys[1], depth))]
    x = jax.random.normal(keys[2], (6, width))

    def model(x, layers):
        for w in layers:
            x = jnp.tanh(x @ w)
        return jnp.sum(x ** 2)

    def lora_loss(factors):
        ls = [LoraArray(l.w, a, b, alpha=l.alpha) for l, (a, b) in zip(layers, factors)]
        return qkern.quaxify(model)(x, ls)

    def ref_loss(factors):
        ls = [qkern.dequantize(l.w) + l.scale * a @ b for l, (a, b) in zip(layers, factors)]
        return model(x, ls)

    factors = [(l.a, l.b) for l in layers]
    got = jax.jit(jax.grad(lora_loss))(factors)
    want = jax.jit(jax.grad(ref_loss))(factors)
    for (ga, gb), (ra, rb) in zip(got, want):
        np.testing.assert_allclose(ga, ra, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(gb, rb, rtol=2e-3, atol=2e-4)
    assert np.any(np.asarray(want[0][0]))          # the bottom layer's a gets a gradient


# -- transformations ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_scan_over_stacked_adapters_cond_and_vmap(keys, kind):
    w = jax.random.normal(keys[0], (3, 64, 64)) / 8
    base = w if kind == "dense" else qkern.quantize(w, "nf4")
    stack = make_lora(base, 64, 64, 4, keys[1], lead=(3,))
    x = jax.random.normal(keys[2], (2, 64))

    def scanned(x, stack):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, stack)[0]

    def unrolled(x, ws):
        for i in range(3):
            x = jnp.tanh(x @ ws[i])
        return x

    ref = unrolled(x, stack.materialise())
    np.testing.assert_allclose(jax.jit(qkern.quaxify(scanned))(x, stack), ref, rtol=1e-4, atol=1e-5)

    single = make_lora(base[0] if kind == "dense" else qkern.quantize(w[0], "nf4"), 64, 64, 4, keys[3])
    cond = qkern.quaxify(lambda p, x, w: lax.cond(p, lambda: x @ w, lambda: x @ w.T))
    np.testing.assert_allclose(cond(False, x, single), x @ single.materialise().T, rtol=1e-4, atol=1e-4)
    vm = jax.vmap(qkern.quaxify(lambda x, w: x @ w), in_axes=(0, None))(x[:, None, :], single)
    np.testing.assert_allclose(vm[:, 0], x @ single.materialise(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_stacked_quantised_base_stays_quantised_per_layer(keys, fmt):
    """A scan step's (or vmap's) layer of a stacked QLoRA weight is one [in, out] layer:
    the codes go into the scan and each step runs the fused kernel; nothing dequantises
    the stack up front."""
    w = jax.random.normal(keys[0], (3, 64, 32)) / 8
    stack = make_lora(qkern.quantize(w, fmt), 64, 32, 2, keys[1], lead=(3,))
    x = jax.random.normal(keys[2], (4, 64))
    layer = jax.tree_util.tree_map(lambda l: l[1], stack)
    assert layer.shape == (64, 32) and layer.aval().shape == (64, 32)
    dense = stack.materialise()
    ref = jnp.einsum("mk,lkn->lmn", x, dense)

    per_layer = qkern.quaxify(lambda ws, x: lax.scan(lambda h, w: (h, x @ w), 0.0, ws)[1])
    np.testing.assert_allclose(jax.jit(per_layer)(stack, x), ref, rtol=1e-4, atol=1e-4)
    jaxpr = jax.make_jaxpr(per_layer)(stack, x).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert all(v.aval.dtype != jnp.float32 or v.aval.shape != (3, 64, 32) for v in scan.invars)
    assert "lora" in str(scan.params["jaxpr"])              # the fused QLoRA kernel, per step

    vm = jax.vmap(qkern.quaxify(lambda w, x: x @ w), in_axes=(0, None))(stack, x)
    np.testing.assert_allclose(vm, ref, rtol=1e-4, atol=1e-4)


def test_nested_quaxify(keys):
    w = jax.random.normal(keys[0], (64, 32))
    lw = make_lora(qkern.quantize(w, "int8"), 64, 32, 4, keys[1])
    x = jax.random.normal(keys[2], (3, 64))
    inner = qkern.quaxify(lambda x, w: x @ w)
    outer = qkern.quaxify(lambda x, w: inner(x, w) * 2)
    np.testing.assert_allclose(outer(x, lw), 2 * x @ lw.materialise(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["xla", "triton", "mosaic_tpu"])
def test_empty_batch(keys, backend):
    """M = 0 gives an empty result (Pallas grids cannot have zero programs)."""
    from qkern.pallas import qmatmul, stored_operand
    from qkern.pallas.lora_qmatmul.api import lora_qmatmul
    w = jax.random.normal(keys[0], (256, 128))
    op = stored_operand(qkern.quantize(w, "int8"))
    interp = backend != "xla"
    x = jnp.ones((0, 256))
    assert qmatmul(x, op, backend=backend, interpret=interp).shape == (0, 128)
    assert qmatmul(jnp.ones((0, 128)), op, transposed=True, backend=backend,
                   interpret=interp).shape == (0, 256)
    a, b = jnp.ones((256, 4)), jnp.ones((4, 128))
    assert lora_qmatmul(x, op, a, b, 1.0, backend=backend, interpret=interp).shape == (0, 128)
    g = jax.grad(lambda a: jnp.sum(lora_qmatmul(x, op, a, b, 1.0, backend=backend,
                                                interpret=interp)))(a)
    assert g.shape == a.shape and not np.any(g)


def test_integer_factors_are_refused_on_every_path(keys):
    from qkern.pallas import stored_operand
    from qkern.pallas.lora_qmatmul.api import lora_qmatmul
    op = stored_operand(qkern.quantize(jax.random.normal(keys[0], (128, 64)), "int8"))
    with pytest.raises(ValueError, match="factor u has dtype int32"):
        lora_qmatmul(jnp.ones((2, 128)), op, jnp.ones((128, 4), jnp.int32), jnp.ones((4, 64)),
                     0.5, backend="xla")
