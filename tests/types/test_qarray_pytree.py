"""QArray as a pytree: flatten / unflatten, jit in and out, static fields in the treedef."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern import QArray

rng = np.random.default_rng(0)
W = rng.standard_normal((96, 40)).astype(np.float32)

CONFIGS = {
    "int4_minmax": ("int4", dict(block_size=32, calibration="minmax")),
    "nf4_dq": ("nf4", dict(double_quant=True)),
    "mxfp8": ("mxfp8", {}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def qw(request) -> QArray:
    fmt, kw = CONFIGS[request.param]
    return qkern.quantize(W, fmt, **kw)


def _same(a: QArray, b: QArray):
    assert type(a) is type(b)
    np.testing.assert_array_equal(np.asarray(a.materialise()), np.asarray(b.materialise()))
    assert a.shape == b.shape and a.dtype == b.dtype and a.fmt == b.fmt


def test_flatten_unflatten_round_trip(qw):
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert leaves, "a QArray has array leaves"
    assert all(isinstance(l, jax.Array) for l in leaves)
    # the codes and scales are leaves; nothing is materialised
    assert any(l is qw.data for l in leaves) and any(l is qw.scales for l in leaves)
    assert all(l.size < qw.size for l in leaves if l is not qw.data)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, QArray)
    _same(back, qw)
    assert back.block_size == qw.block_size and back.block_axis == qw.block_axis


def test_optional_fields_are_leaves_only_when_present():
    n = lambda q: len(jax.tree_util.tree_leaves(q))
    plain = qkern.quantize(W, "int4")
    zp = qkern.quantize(W, "int4", calibration="minmax")
    dq = qkern.quantize(W, "nf4", double_quant=True)
    assert n(zp) == n(plain) + 1             # + zero points
    assert n(dq) > n(plain)                  # + double-quantisation scale(s)
    assert plain.zeros is None and zp.zeros is not None


def test_tree_map_keeps_a_qarray(qw):
    out = jax.tree_util.tree_map(lambda x: x, qw)
    assert isinstance(out, QArray)
    _same(out, qw)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(qw)]
    assert any("data" in p for p in paths) and any("scales" in p for p in paths)


def test_static_fields_live_in_the_treedef(qw):
    td = jax.tree_util.tree_structure(qw)
    hash(td)
    fmt, kw = CONFIGS[[k for k, v in CONFIGS.items() if v[0] == qw.fmt][0]]
    # same configuration, different values: same treedef
    other = qkern.quantize(W * 2 + 1, fmt, **kw)
    assert jax.tree_util.tree_structure(other) == td
    # format, block size, logical dtype, pending transpose: different treedefs
    assert jax.tree_util.tree_structure(qkern.quantize(W, "fp8_e4m3")) != td
    if qw.fmt != "mxfp8":
        bs = 16 if qw.block_size != 16 else 8
        assert jax.tree_util.tree_structure(qkern.quantize(W, fmt, **{**kw, "block_size": bs})) != td
    assert jax.tree_util.tree_structure(
        qkern.quantize(jnp.asarray(W, jnp.bfloat16), fmt, **kw)) != td
    t = qkern.quaxify(lambda w: w.T)(qw)
    assert jax.tree_util.tree_structure(t) != td
    assert jax.tree_util.tree_leaves(t)[0] is jax.tree_util.tree_leaves(qw)[0]


def test_jit_passes_qarray_in_and_out(qw):
    out = jax.jit(lambda q: q)(qw)
    assert isinstance(out, QArray)
    _same(out, qw)
    # (XLA may fuse the double-quantised scale arithmetic: equal up to float32 rounding)
    np.testing.assert_allclose(np.asarray(jax.jit(qkern.dequantize)(qw)),
                               np.asarray(qkern.dequantize(qw)), rtol=1e-6, atol=1e-6)
    # in a container, next to plain arrays
    tree = jax.jit(lambda t: {"w": t["w"], "b": t["b"] + 1})({"w": qw, "b": jnp.zeros(3)})
    assert isinstance(tree["w"], QArray)


def test_jit_traces_once_per_configuration():
    traces = []

    @jax.jit
    def f(q, x):
        traces.append(1)
        return qkern.quaxify(lambda q, x: x @ q)(q, x)

    x = jnp.ones((2, 96), jnp.float32)
    a = qkern.quantize(W, "int4")
    b = qkern.quantize(W * 2, "int4")     # a power of two: exactly twice the scales
    ya, yb = f(a, x), f(b, x)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(yb), 2 * np.asarray(ya), rtol=1e-6, atol=1e-6)
    f(qkern.quantize(W, "int4", block_size=32), x)
    assert len(traces) == 2


def test_quantize_inside_jit_returns_the_same_qarray():
    for fmt in ("int4", "nf4"):
        eager = qkern.quantize(W, fmt)
        jitted = jax.jit(lambda w: qkern.quantize(w, fmt))(W)
        assert isinstance(jitted, QArray)
        assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
        for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_aval_is_logical():
    q = qkern.quantize(jnp.asarray(W, jnp.bfloat16), "int4")
    assert q.aval().shape == (96, 40) and q.aval().dtype == jnp.bfloat16
    assert q.data.shape != (96, 40)          # packed storage differs from the logical shape
    assert jax.eval_shape(lambda q: q, q).shape == (96, 40)
    t = qkern.quaxify(lambda w: w.T)(q)
    assert t.aval().shape == (40, 96)
    assert "int4" in repr(q) and "(96, 40)" in repr(q)


@pytest.mark.parametrize("fmt, axis", [("int8", -2), ("nf4", -2), ("mxfp4", -2), ("int4", -1)])
def test_vmap_of_quantize_builds_the_stacked_qarray(fmt, axis, tmp_path):
    """jax.vmap(quantize) returns per-example fields stacked under the per-example layout;
    the QArray reads its stacked layout from its arrays, so it is the same QArray as
    quantising the stack at once (it could not be printed, dequantised or used before)."""
    ws = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 32))
    v = jax.vmap(lambda w: qkern.quantize(w, fmt, axis=axis))(ws)
    whole = qkern.quantize(ws, fmt, axis=axis)
    assert v.shape == (3, 64, 32) and "shape=(3, 64, 32)" in repr(v)
    np.testing.assert_array_equal(v.data, whole.data)
    np.testing.assert_array_equal(qkern.dequantize(v), qkern.dequantize(whole))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 64))
    per_layer = qkern.quaxify(lambda ws, x: jax.lax.scan(lambda h, w: (h, x @ w), 0.0, ws)[1])
    np.testing.assert_allclose(jax.jit(per_layer)(v, x), per_layer(whole, x), rtol=1e-6, atol=1e-6)
    qkern.save(tmp_path / "v.safetensors", {"w": v})
    np.testing.assert_array_equal(qkern.dequantize(qkern.load(tmp_path / "v.safetensors")["w"]),
                                  qkern.dequantize(whole))


def test_vmap_of_per_tensor_quantize_is_refused_clearly():
    ws = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 32))
    v = jax.vmap(lambda w: qkern.quantize(w, "int8", axis=None))(ws)
    with pytest.raises(ValueError, match="its own per-tensor scale"):
        qkern.dequantize(v)
