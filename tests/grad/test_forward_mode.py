"""Forward mode through the kernels: `jax.jvp`, `jax.jacfwd`, `jax.hessian`, `jax.linearize`
and forward-over-reverse Hessian-vector products, against the same computation on the
dequantised weight, under jit, vmap, scan, cond and nested quaxify. The kernel families are
linear primitives in x (`qkern/pallas/_linear.py`); W8A8 is straight-through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

lax = jax.lax


def _key(i):
    return jax.random.PRNGKey(i)


def _close(got, want, tol):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.shape == w.shape
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=0, atol=tol * scale)


def _pair(fmt, k=96, n=40, **kw):
    w = jax.random.normal(_key(0), (k, n)) / 8
    q = qkern.quantize(w, fmt, **kw)
    return q, qkern.dequantize(q)


# M = 1 runs the native small-M kernel, 64 the native GEMM, 300 dequantise-then-dot (CPU)
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("fmt", ["int8", "nf4", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("transposed", [False, True])
def test_jvp_matches_dense(fmt, m, transposed):
    q, wd = _pair(fmt)
    x = jax.random.normal(_key(m), (m, 40 if transposed else 96))
    t = jax.random.normal(_key(m + 1), x.shape)
    mm = (lambda x, w: x @ w.T) if transposed else (lambda x, w: x @ w)
    f = qkern.quaxify(lambda x, w: jnp.tanh(mm(x, w)))
    y, dy = jax.jit(lambda x, t: jax.jvp(lambda x: f(x, q), (x,), (t,)))(x, t)
    yd, dyd = jax.jvp(lambda x: jnp.tanh(mm(x, wd)), (x,), (t,))
    _close(y, yd, 1e-5)
    _close(dy, dyd, 1e-5)


def test_jacfwd_equals_jacrev_and_dense():
    q, wd = _pair("nf4", 64, 32)
    x = jax.random.normal(_key(1), (3, 64))
    f = qkern.quaxify(lambda x, w: jnp.sin(x @ w))
    jf = jax.jacfwd(f)(x, q)
    assert jf.shape == (3, 32, 3, 64)
    _close(jf, jax.jacrev(f)(x, q), 1e-6)
    _close(jf, jax.jacfwd(lambda x: jnp.sin(x @ wd))(x), 1e-5)


def test_hessian_and_hvp_forward_over_reverse():
    q, wd = _pair("int4", 64, 32)
    x = jax.random.normal(_key(1), (2, 64))
    v = jax.random.normal(_key(2), x.shape)
    f = qkern.quaxify(lambda x, w: jnp.sum(jnp.tanh(x @ w)))
    fd = lambda x: jnp.sum(jnp.tanh(x @ wd))                            # noqa: E731
    h = jax.jit(jax.hessian(f))(x, q)
    assert h.shape == (2, 64, 2, 64)
    _close(h, jax.hessian(fd)(x), 1e-5)
    hvp = jax.jvp(jax.grad(lambda x: f(x, q)), (x,), (v,))[1]         # forward over reverse
    _close(hvp, jax.jvp(jax.grad(fd), (x,), (v,))[1], 1e-5)
    rof = jax.grad(lambda x: jnp.sum(jax.jvp(lambda x: f(x, q), (x,), (v,))[1]))(x)
    _close(rof, jax.grad(lambda x: jnp.sum(jax.jvp(fd, (x,), (v,))[1]))(x), 1e-5)


def test_linearize_and_its_transpose():
    q, wd = _pair("int8", 64, 32)
    x = jax.random.normal(_key(1), (4, 64))
    t = jax.random.normal(_key(2), x.shape)
    f = qkern.quaxify(lambda x, w: x @ w)
    y, lin = jax.linearize(lambda x: f(x, q), x)
    _close(lin(t), t @ wd, 1e-5)
    ct = jax.random.normal(_key(3), y.shape)
    dx, = jax.linear_transpose(lin, x)(ct)
    _close(dx, ct @ wd.T, 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vmap_jit_scan_cond(dtype):
    q = qkern.quantize((jax.random.normal(_key(0), (64, 48)) / 8).astype(dtype), "nf4")
    wd = qkern.dequantize(q)
    xs = jax.random.normal(_key(1), (3, 5, 64)).astype(dtype)
    ts = jax.random.normal(_key(2), xs.shape).astype(dtype)
    layer = qkern.quaxify(lambda x, w: jnp.tanh(x @ w))

    def fq(x):     # the quantised weight as a closed-over constant, as in a model
        return layer(x, q)

    def fd(x):
        return jnp.tanh(x @ wd.astype(dtype))

    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    want = jax.vmap(lambda x, t: jax.jvp(fd, (x,), (t,)))(xs, ts)
    # vmap of jvp, jvp of vmap, jit of both
    _close(jax.vmap(lambda x, t: jax.jvp(fq, (x,), (t,)))(xs, ts), want, tol)
    _close(jax.jvp(jax.jit(jax.vmap(fq)), (xs,), (ts,)), want, tol)
    # inside lax.scan and lax.cond
    def scanned(x):
        return lax.scan(lambda c, xi: (c, fq(xi)), 0.0, x)[1]
    _close(jax.jvp(scanned, (xs,), (ts,)), want, tol)
    got = jax.jvp(lambda x: lax.cond(True, fq, lambda x: jnp.zeros((5, 48), dtype), x), (xs[0],),
                  (ts[0],))
    _close(got, jax.jvp(fd, (xs[0],), (ts[0],)), tol)


def test_stacked_weight_under_vmap_and_nested_quaxify():
    w = jax.random.normal(_key(0), (3, 64, 32)) / 8
    q = qkern.quantize(w, "int8")
    wd = qkern.dequantize(q)
    x = jax.random.normal(_key(1), (3, 2, 64))
    t = jax.random.normal(_key(2), x.shape)
    inner = qkern.quaxify(lambda x, w: jnp.sin(x @ w))
    f = qkern.quaxify(lambda x, w: jax.vmap(inner)(x, w))
    got = jax.jvp(lambda x: f(x, q), (x,), (t,))
    want = jax.jvp(lambda x: jnp.sin(jnp.einsum("bmk,bkn->bmn", x, wd)), (x,), (t,))
    _close(got, want, 1e-5)
    jac = jax.jacfwd(lambda x: f(x, q))(x[:, :1])        # a batched weight, batched tangents
    _close(jac, jax.jacrev(lambda x: f(x, q))(x[:, :1]), 1e-6)


def test_w8a8_is_straight_through_in_forward_mode():
    """The tangent is dx @ W (the rounding of x as the identity), the transpose of the
    gradient: jacfwd equals jacrev, and both equal the weight-only Jacobian of the linear
    part."""
    q, wd = _pair("int8", 64, 32, act_fmt="int8")
    x = jax.random.normal(_key(1), (3, 64))
    t = jax.random.normal(_key(2), x.shape)
    f = qkern.quaxify(lambda x, w: x @ w)
    _close(jax.jvp(lambda x: f(x, q), (x,), (t,))[1], t @ wd, 1e-5)
    g = qkern.quaxify(lambda x, w: jnp.tanh(x @ w))
    _close(jax.jacfwd(g)(x, q), jax.jacrev(g)(x, q), 1e-6)
    _close(jax.hessian(lambda x, w: jnp.sum(g(x, w)))(x, q),
           jax.jacrev(jax.jacrev(lambda x, w: jnp.sum(g(x, w))))(x, q), 1e-5)


@pytest.mark.parametrize("w8a8", [False, True])
def test_ragged(w8a8):
    w = jax.random.normal(_key(0), (3, 64, 32)) / 8
    q = qkern.quantize(w, "int8", act_fmt="int8" if w8a8 else None)
    wd = qkern.dequantize(q)
    x = jax.random.normal(_key(1), (10, 64))
    t = jax.random.normal(_key(2), x.shape)
    g = jnp.array([4, 0, 5], jnp.int32)                 # an empty group; 9 of 10 rows
    f = qkern.quaxify(lambda x, w: jnp.tanh(lax.ragged_dot(x, w, g)))
    _, dy = jax.jvp(lambda x: f(x, q), (x,), (t,))
    y = f(x, q)
    # straight-through for W8A8: the tangent is (1 - y^2) * ragged_dot(t, W)
    _close(dy, (1 - y ** 2) * lax.ragged_dot(t, wd, g), 1e-5)
    _close(jax.jacfwd(f)(x, q), jax.jacrev(f)(x, q), 1e-6)


@pytest.mark.parametrize("act_fmt", [None, "int8"])
def test_conv(act_fmt):
    w = jax.random.normal(_key(0), (3, 3, 8, 16)) / 8                  # HWIO
    q = qkern.quantize(w, "int8", axis=2, act_fmt=act_fmt)
    wd = qkern.dequantize(q)
    x = jax.random.normal(_key(1), (2, 9, 9, 8))
    t = jax.random.normal(_key(2), x.shape)
    conv = lambda x, w: lax.conv_general_dilated(                       # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    f = qkern.quaxify(lambda x, w: jnp.tanh(conv(x, w)))
    y, dy = jax.jvp(lambda x: f(x, q), (x,), (t,))
    _close(dy, (1 - y ** 2) * conv(t, wd), 1e-5)
    hvp = jax.jvp(jax.grad(lambda x: jnp.sum(f(x, q))), (x,), (t,))[1]
    want = jax.grad(lambda x: jnp.vdot(jax.grad(lambda x: jnp.sum(f(x, q)))(x), t))(x)
    _close(hvp, want, 1e-5)


def test_zero_tangent_and_jit_reuse():
    q, wd = _pair("int8", 64, 32)
    x = jax.random.normal(_key(1), (2, 64))
    f = qkern.quaxify(lambda x, w, s: (x * s) @ w)
    # the tangent reaches the matmul through s only; x's is symbolically zero
    _, dy = jax.jvp(lambda s: f(x, q, s), (jnp.float32(2.0),), (jnp.float32(1.0),))
    _close(dy, x @ wd, 1e-5)
    _, dy0 = jax.jvp(lambda x: f(x, q, 1.0), (x,), (jnp.zeros_like(x),))
    assert not np.any(np.asarray(dy0))


@pytest.mark.parametrize("act_fmt", [None, "int8"])
def test_fake_quant_kernels_straight_through_in_forward_mode(act_fmt):
    """QAT with the serving kernels (`fake_quant(kernels=True)`): the tangent is straight
    through the weight's rounding (and W8A8's activation rounding), in both arguments, and
    jacfwd equals jacrev."""
    w = jax.random.normal(_key(0), (64, 32)) / 8
    x = jax.random.normal(_key(1), (3, 64))
    tw, tx = jax.random.normal(_key(2), w.shape), jax.random.normal(_key(3), x.shape)
    run = qkern.quaxify(lambda w, x: x @ w)
    rules = [qkern.Rule(r"w", "int8", act_fmt=act_fmt)]

    def f(w, x):
        return run(qkern.fake_quant({"w": w}, rules=rules, kernels=True)["w"], x)

    wq = qkern.fake_quant(w, "int8")
    _, dy = jax.jvp(f, (w, x), (tw, tx))
    _close(dy, tx @ wq + x @ tw, 1e-5)
    _close(jax.jacfwd(f, argnums=(0, 1))(w, x[:1]), jax.jacrev(f, argnums=(0, 1))(w, x[:1]),
           1e-6)


@pytest.mark.parametrize("transposed", [False, True])
def test_qlora_jvp_and_hvp_in_factors_and_x(transposed):
    """The fused QLoRA kernel: tangents in a, b and x at once, and the forward-over-reverse
    Hessian-vector product with respect to the factors (what sharpness or influence
    estimates of an adapter take), against the dense weight."""
    q, wd = _pair("nf4", 64, 48)
    a = jax.random.normal(_key(1), (64, 4)) * 0.1
    b = jax.random.normal(_key(2), (4, 48)) * 0.1
    x = jax.random.normal(_key(3), (5, 48 if transposed else 64))
    mm = (lambda x, w: x @ w.T) if transposed else (lambda x, w: x @ w)
    fq = qkern.quaxify(lambda lw, x: jnp.tanh(mm(x, lw)))
    qf = lambda a, b, x: fq(qkern.LoraArray(q, a, b, alpha=8.0), x)    # noqa: E731
    df = lambda a, b, x: jnp.tanh(mm(x, wd + 2.0 * a @ b))             # noqa: E731
    args = (a, b, x)
    ts = tuple(jax.random.normal(_key(10 + i), v.shape) for i, v in enumerate(args))
    _close(jax.jit(lambda *z: jax.jvp(qf, z[:3], z[3:]))(*args, *ts), jax.jvp(df, args, ts),
           1e-5)
    loss = lambda f: lambda a, b: jnp.sum(f(a, b, x) ** 2)             # noqa: E731
    hvp = lambda f: jax.jvp(jax.grad(loss(f), argnums=(0, 1)), (a, b), ts[:2])[1]  # noqa: E731
    _close(hvp(qf), hvp(df), 1e-5)
