"""QArray under qkern.quaxify: every operation gives the same result as on the
dequantised array, and the operations the issue lists keep the QArray quantised
(transpose, dtype casts to floats, reshapes that leave the block axis whole, slicing and
indexing along other axes). `quaxify(f)(qw)` returns the Value when f returns one, which
is how the intermediate's type is observed."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern import QArray

K, N = 70, 33          # odd; 70 is not a multiple of the 32-blocks used below
rng = np.random.default_rng(0)
W2 = rng.standard_normal((K, N)).astype(np.float32)
W3 = rng.standard_normal((3, K, N)).astype(np.float32)
W4 = rng.standard_normal((2, 3, K, N)).astype(np.float32)

# name -> (format, options). Together: per channel, packed with zero points and a ragged
# block, double-quantised codebook, MX (uint8 e8m0 scales), per tensor.
KINDS = {
    "int8": ("int8", {}),
    "int4_minmax": ("int4", dict(block_size=32, calibration="minmax")),
    "nf4_dq": ("nf4", dict(block_size=16, double_quant=True)),
    "mxfp4": ("mxfp4", {}),
    "int8_tensor": ("int8", dict(axis=None)),
}
BLOCKED = ["int8", "int4_minmax", "nf4_dq", "mxfp4"]
MATMUL = ["int8", "int4_minmax", "nf4_dq"]   # mxfp4 and per tensor: in test_x_at_w


def quantize(w, kind, **extra):
    fmt, kw = KINDS[kind]
    return jax.jit(lambda w: qkern.quantize(w, fmt, **{**kw, **extra}))(w)


_cache: dict = {}


def q2(kind) -> QArray:
    """[K, N], blocks along axis 0 (the default axis -2)."""
    if ("2", kind) not in _cache:
        _cache["2", kind] = quantize(W2, kind)
    return _cache["2", kind]


def q3(kind) -> QArray:
    """[3, K, N], blocks along axis 1."""
    if ("3", kind) not in _cache:
        _cache["3", kind] = quantize(W3, kind)
    return _cache["3", kind]


_materialise = jax.jit(lambda q: q.materialise())


def dense(q: QArray) -> jax.Array:
    return _materialise(q)


def assert_close(got, want, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    scale = float(np.max(np.abs(want.astype(np.float32)))) if want.size else 1.0
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                               rtol=rtol, atol=rtol * scale)


def run(f, q, *args, stays_quantised: bool | None = None, rtol=1e-5):
    """quaxify(f)(q, *args) against f(q.materialise(), *args)."""
    out = qkern.quaxify(f)(q, *args)
    want = f(dense(q), *args)
    if stays_quantised is True:
        assert isinstance(out, QArray), f"expected a QArray, got {type(out).__name__}"
    if isinstance(out, QArray):
        assert out.shape == want.shape and out.dtype == want.dtype
        out = dense(out)
    assert_close(out, want, rtol)
    return out


# -- materialise ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_materialise_equals_dequantize(kind):
    q = q2(kind)
    np.testing.assert_array_equal(np.asarray(q.materialise()), np.asarray(qkern.dequantize(q)))
    assert q.materialise().shape == (K, N) and q.materialise().dtype == jnp.float32


# -- transpose: metadata only ------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_transpose_is_metadata_only(kind):
    q = q2(kind)
    t = qkern.quaxify(lambda w: w.T)(q)
    assert isinstance(t, QArray)
    assert t.shape == (N, K) and t.dtype == q.dtype
    # no new storage: the same arrays, only the static metadata changes
    assert t.data is q.data and t.scales is q.scales
    assert t.zeros is q.zeros and t.dq_scale is q.dq_scale
    np.testing.assert_array_equal(np.asarray(dense(t)), np.asarray(dense(q)).T)
    if q.block_axis is not None:
        assert t.block_axis == 1 - q.block_axis
    tt = qkern.quaxify(lambda w: w.T.T)(q)
    assert isinstance(tt, QArray) and tt.shape == (K, N)
    np.testing.assert_array_equal(np.asarray(dense(tt)), np.asarray(dense(q)))


@pytest.mark.parametrize("kind", BLOCKED)
def test_transpose_rank3_permutations(kind):
    q = q3(kind)
    perms = list(itertools.permutations(range(3))) if kind == "int8" else [(1, 0, 2), (2, 0, 1)]
    ref = np.asarray(dense(q))
    for perm in perms:
        t = qkern.quaxify(lambda w: jnp.transpose(w, perm))(q)
        assert isinstance(t, QArray) and t.data is q.data
        assert t.shape == tuple(q.shape[p] for p in perm)
        np.testing.assert_array_equal(np.asarray(dense(t)), ref.transpose(perm))
    # two transposes compose
    t = qkern.quaxify(lambda w: jnp.transpose(jnp.transpose(w, (1, 2, 0)), (2, 0, 1)))(q)
    assert isinstance(t, QArray) and t.data is q.data
    np.testing.assert_array_equal(np.asarray(dense(t)), ref.transpose(1, 2, 0).transpose(2, 0, 1))


# -- dtype casts -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BLOCKED)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_astype_float_stays_quantised(kind, dtype):
    q = q2(kind)
    c = qkern.quaxify(lambda w: w.astype(dtype))(q)
    assert isinstance(c, QArray) and c.dtype == dtype and c.shape == (K, N)
    assert c.data is q.data
    np.testing.assert_array_equal(np.asarray(dense(c)), np.asarray(dense(q).astype(dtype)))


def test_astype_after_transpose_and_int_cast():
    q = q2("int8")
    c = qkern.quaxify(lambda w: w.T.astype(jnp.bfloat16))(q)
    assert isinstance(c, QArray) and c.dtype == jnp.bfloat16 and c.shape == (N, K)
    np.testing.assert_array_equal(np.asarray(dense(c)), np.asarray(dense(q).T.astype(jnp.bfloat16)))
    i = qkern.quaxify(lambda w: (w * 10).astype(jnp.int32))(q)
    assert not isinstance(i, QArray)
    np.testing.assert_array_equal(np.asarray(i), np.asarray((dense(q) * 10).astype(jnp.int32)))


def test_astype_bf16_weight_to_float32():
    """A bfloat16 QArray cast to float32 changes the compute dtype: the result is the
    float32 dequantisation, within bfloat16 rounding of the bf16 materialisation."""
    qb = quantize(jnp.asarray(W2, jnp.bfloat16), "int8")
    assert qb.dtype == jnp.bfloat16
    c = qkern.quaxify(lambda w: w.astype(jnp.float32))(qb)
    assert isinstance(c, QArray) and c.dtype == jnp.float32
    assert_close(dense(c), dense(qb).astype(jnp.float32), rtol=2 ** -8)


# -- reshapes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BLOCKED)
def test_reshapes_that_keep_the_block_axis_whole(kind):
    q = q3(kind)                                     # [3, K, N], block axis 1
    run(lambda w: w.reshape(1, 3, K, N), q, stays_quantised=True)       # leading unit dim
    run(lambda w: w.reshape(3, K, N, 1), q, stays_quantised=True)       # trailing unit dim
    run(lambda w: w.reshape(3, K, 3, 11), q, stays_quantised=True)      # split a non-block axis
    run(lambda w: w.reshape(1, 3, K, N).reshape(3, K, N), q, stays_quantised=True)
    q4 = quantize(W4, kind)                           # [2, 3, K, N], block axis 2
    r = run(lambda w: w.reshape(6, K, N), q4, stays_quantised=True)     # merge leading axes
    np.testing.assert_array_equal(np.asarray(r), np.asarray(dense(q4)).reshape(6, K, N))


@pytest.mark.parametrize("kind", list(KINDS))
def test_reshapes_that_split_or_merge_the_block_axis_are_still_correct(kind):
    q = q3(kind)
    run(lambda w: w.reshape(3 * K, N), q)
    run(lambda w: w.reshape(3, 7, 10, N), q)
    run(lambda w: w.reshape(-1), q)
    run(lambda w: jnp.swapaxes(w, 1, 2).reshape(3, N * K), q)


def test_reshape_then_matmul_uses_the_new_block_axis():
    q = q3("int4_minmax")
    x = jnp.asarray(rng.standard_normal((6, 5, K)), jnp.float32)
    run(lambda w, x: x @ w.reshape(1, 3, K, N).reshape(3, K, N)[jnp.array([0, 1, 2, 0, 1, 2])],
        q, x)
    run(lambda w, x: jnp.einsum("bmk,bkn->bmn", x[:3], w.reshape(1, 3, K, N)[0]), q, x)


# -- slicing and indexing ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", BLOCKED)
def test_slicing_other_axes_stays_quantised(kind):
    q = q2(kind)                                     # [K, N], block axis 0
    run(lambda w: w[:, 2:5], q, stays_quantised=True)
    run(lambda w: w[:, ::3], q, stays_quantised=True)
    run(lambda w: w[:, 7], q, stays_quantised=True)
    run(lambda w: w[:, -1], q, stays_quantised=True)
    run(lambda w: w.T[2:5], q, stays_quantised=True)   # after a transpose: N is first
    q3_ = q3(kind)                                   # [3, K, N], block axis 1
    run(lambda w: w[1:3], q3_, stays_quantised=True)
    run(lambda w: w[1], q3_, stays_quantised=True)
    run(lambda w: w[:, :, 4], q3_, stays_quantised=True)
    run(lambda w: w[2, :, 3:9], q3_, stays_quantised=True)
    run(lambda w: jnp.swapaxes(w, 0, 2)[3:9], q3_, stays_quantised=True)  # N first, then sliced


@pytest.mark.parametrize("kind", list(KINDS))
def test_slicing_the_block_axis_is_still_correct(kind):
    q = q2(kind)
    run(lambda w: w[1:3], q)
    run(lambda w: w[5], q)
    run(lambda w: w[33:70:2, 1:4], q)
    run(lambda w: w[-1], q)
    run(lambda w: w[jnp.array([0, 69, 3])], q)   # gather


@pytest.mark.parametrize("kind", BLOCKED)
def test_traced_index_under_jit(kind):
    q = q3(kind)
    f = jax.jit(qkern.quaxify(lambda w, i: w[i]))
    for i in (0, 2, -1):
        out = f(q, i)
        assert isinstance(out, QArray)
        np.testing.assert_array_equal(np.asarray(dense(out)), np.asarray(dense(q))[i])
    g = jax.jit(qkern.quaxify(lambda w, i: w[:, i]))     # along the block axis
    for i in (0, 33, K - 1):
        np.testing.assert_allclose(np.asarray(g(q, i)), np.asarray(dense(q))[:, i], rtol=1e-6)
    h = jax.jit(qkern.quaxify(lambda w, i, j: jax.lax.dynamic_slice_in_dim(w[i], j, 4, axis=1)))
    out = h(q, 1, 10)                                   # a dynamic slice along N
    assert isinstance(out, QArray)
    np.testing.assert_array_equal(np.asarray(dense(out)), np.asarray(dense(q))[1, :, 10:14])


# -- matmuls -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_x_at_w(kind):
    q = q2(kind)
    x1 = jnp.asarray(rng.standard_normal((1, K)), jnp.float32)     # M = 1 (decode)
    x5 = jnp.asarray(rng.standard_normal((5, K)), jnp.float32)
    run(lambda w, x: x @ w, q, x1)
    run(lambda w, x: jnp.dot(x, w), q, x5)
    run(lambda w, x: x[0] @ w, q, x5)                              # vector @ matrix
    x3 = jnp.asarray(rng.standard_normal((2, 3, K)), jnp.float32)
    run(lambda w, x: x @ w, q, x3)                                 # leading dims on x


@pytest.mark.parametrize("kind", ["int4_minmax", "nf4_dq"])  # int8: test_x_at_w, grad
def test_matmul_layouts(kind):
    q = q2(kind)                                                   # [K, N]
    xk = jnp.asarray(rng.standard_normal((4, K)), jnp.float32)
    xn = jnp.asarray(rng.standard_normal((N, 3)), jnp.float32)
    xm = jnp.asarray(rng.standard_normal((4, N)), jnp.float32)
    run(lambda w, x: w @ x, q, xn)                  # QArray as lhs
    run(lambda w, x: x @ w.T, q, xm)                # transposed weight on the right
    run(lambda w, x: w.T @ x.T, q, xk)              # transposed weight on the left
    run(lambda w, x: jnp.einsum("kn,mk->nm", w, x), q, xk)
    run(lambda w, x: jax.lax.dot_general(w, x, (((0,), (1,)), ((), ()))), q, xk)
    run(lambda w, x: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))), q, xm)
    run(lambda w, x: jnp.tensordot(x, w, axes=([1], [0])), q, xk)


@pytest.mark.parametrize("kind", MATMUL)
def test_batched_einsum_rank3(kind):
    q = q3(kind)                                                   # [3, K, N]
    x = jnp.asarray(rng.standard_normal((3, 5, K)), jnp.float32)
    run(lambda w, x: jnp.einsum("bik,bkn->bin", x, w), q, x)
    run(lambda w, x: jnp.einsum("bkn,bik->bni", w, x), q, x)
    run(lambda w, x: jax.lax.dot_general(x, w, (((2,), (1,)), ((0,), (0,)))), q, x)
    y = jnp.asarray(rng.standard_normal((3, N, 2)), jnp.float32)
    run(lambda w, y: jnp.einsum("bkn,bnj->bkj", w, y), q, y)      # contract the non-block axis
    run(lambda w, x: jnp.einsum("bik,bkn->bin", x, w.astype(jnp.bfloat16)), q,
        x.astype(jnp.bfloat16), rtol=2e-2)


@pytest.mark.parametrize("kind", ["int8", "nf4_dq"])
def test_qarray_at_qarray(kind):
    fmt, kw = KINDS[kind]
    a = rng.standard_normal((5, K)).astype(np.float32)
    qa = jax.jit(lambda a: qkern.quantize(a, "int8", axis=-1))(a)
    qb = q2(kind)
    out = qkern.quaxify(lambda a, b: a @ b)(qa, qb)
    assert_close(out, dense(qa) @ dense(qb))
    out = qkern.quaxify(lambda a, b: b.T @ a.T)(qa, qb)
    assert_close(out, dense(qb).T @ dense(qa).T)


@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4_minmax", "mxfp4"])
def test_activation_dtypes(kind, xdtype):
    q = q2(kind)
    x = jnp.asarray(rng.standard_normal((3, K)), xdtype)
    out = run(lambda w, x: x @ w, q, x, rtol=1e-5 if xdtype == jnp.float32 else 1e-2)
    assert out.dtype == jnp.result_type(x.dtype, q.dtype)
    qb = qkern.quaxify(lambda w: w.astype(xdtype))(q)
    out = run(lambda w, x: x @ w, qb, x, rtol=1e-5 if xdtype == jnp.float32 else 1e-2)
    assert out.dtype == xdtype


@pytest.mark.parametrize("kind", MATMUL)
def test_matmul_under_jit(kind):
    q = q2(kind)
    x = jnp.asarray(rng.standard_normal((7, K)), jnp.float32)
    f = jax.jit(qkern.quaxify(lambda w, x: jax.nn.relu(x @ w) @ w.T))
    want = jax.nn.relu(x @ dense(q)) @ dense(q).T
    assert_close(f(q, x), want)


@pytest.mark.parametrize("kind", ["int8", "nf4_dq"])
def test_grad_with_respect_to_x(kind):
    q = q2(kind)
    x = jnp.asarray(rng.standard_normal((4, K)), jnp.float32)

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    g = jax.grad(lambda x: qkern.quaxify(loss)(q, x))(x)
    g_jit = jax.jit(jax.grad(qkern.quaxify(loss), argnums=1))(q, x)
    want = jax.grad(loss, argnums=1)(dense(q), x)
    assert_close(g, want, rtol=1e-4)
    assert_close(g_jit, want, rtol=1e-4)
    # through a transposed weight as well
    g = jax.grad(lambda x: qkern.quaxify(lambda w, x: jnp.sum((x @ w @ w.T) ** 2))(q, x))(x)
    want = jax.grad(lambda x: jnp.sum((x @ dense(q) @ dense(q).T) ** 2))(x)
    assert_close(g, want, rtol=1e-4)


@pytest.mark.parametrize("kind", MATMUL)
def test_vmap_over_x(kind):
    q = q2(kind)
    xs = jnp.asarray(rng.standard_normal((6, 3, K)), jnp.float32)
    f = jax.vmap(qkern.quaxify(lambda w, x: x @ w), in_axes=(None, 0))
    assert_close(f(q, xs), jnp.einsum("bmk,kn->bmn", xs, dense(q)))
    g = jax.jit(jax.vmap(qkern.quaxify(lambda w, x: w.T @ x), in_axes=(None, 0)))
    xv = xs[:, 0]
    assert_close(g(q, xv), jnp.einsum("kn,bk->bn", dense(q), xv))
