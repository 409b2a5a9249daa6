"""ragged_dot with stacked quantised experts (`qkern.quantize(w, fmt, axis=-2)` on
[E, K, N]) under quaxify, against an independent reference: a numpy loop over the
groups, each group's rows times its expert dequantised (float64)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

E, K, N = 4, 67, 37          # odd K (padded blocks) and N


def _w(e=E, k=K, n=N, seed=0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.PRNGKey(seed), (e, k, n)) * 0.5).astype(dtype)


def _x(m, k=K, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (m, k)).astype(dtype)


def loop_reference(x, q, sizes, *, transposed=False):
    """Row i of x times the dequantised expert of its group; rows past the sum are zero."""
    w = np.asarray(qkern.dequantize(q), np.float64)
    if transposed:
        w = np.swapaxes(w, 1, 2)
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, g in enumerate(np.asarray(sizes).tolist()):
        stop = min(start + g, x.shape[0])
        out[start:stop] = x[start:stop] @ w[e]
        start = stop
    return out


ragged = qkern.quaxify(lambda q, x, g: jax.lax.ragged_dot(x, q, g))

GROUPS = [                      # (M, group sizes)
    (10, [3, 0, 5, 2]),         # an empty group
    (10, [1, 1, 1, 1]),         # groups of one row; sum 4 < M: rows 4.. are zero
    (1, [0, 0, 1, 0]),          # M = 1
    (1, [0, 0, 0, 0]),          # nothing routed
    (40, [17, 0, 0, 23]),       # groups longer than the decode window
    (300, [130, 0, 150, 10]),   # windows of 128 rows (small experts: dequantise-then-dot)
]


def _close(got, want, dtype, scale):
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3", "int1"])
@pytest.mark.parametrize("m, sizes", GROUPS)
def test_matches_the_per_group_loop(fmt, m, sizes):
    q = qkern.quantize(_w(), fmt, axis=-2)
    x = _x(m)
    g = jnp.asarray(sizes, jnp.int32)
    want = loop_reference(x, q, sizes)
    got = ragged(q, x, g)
    assert got.shape == (m, N) and got.dtype == jnp.float32
    _close(got, want, jnp.float32, np.abs(want).max() + 1)
    _close(jax.jit(ragged)(q, x, g), want, jnp.float32, np.abs(want).max() + 1)


@pytest.mark.parametrize("fmt", ["int8", "nf4", "int4"])
def test_bfloat16_weights_and_activations(fmt):
    q = qkern.quantize(_w(dtype=jnp.bfloat16), fmt, axis=-2)
    x = _x(12, dtype=jnp.bfloat16)
    sizes = [4, 3, 0, 5]
    got = jax.jit(ragged)(q, x, jnp.asarray(sizes))
    assert got.dtype == jnp.bfloat16
    want = loop_reference(x, q, sizes)
    _close(got, want, jnp.bfloat16, np.abs(want).max())


def test_the_kernel_runs_and_no_expert_stack_is_materialised():
    q = qkern.quantize(_w(), "nf4", axis=-2)
    jaxpr = str(jax.make_jaxpr(ragged)(q, _x(10), jnp.asarray([3, 0, 5, 2])))
    assert "ragged_dot_general" not in jaxpr and "while" in jaxpr
    assert f"f32[{E},{K},{N}]" not in jaxpr
    # the fallback (blocks along the experts axis) does materialise it: the check can fail
    q_n = qkern.quantize(_w(), "int8", axis=0)
    fallback = str(jax.make_jaxpr(ragged)(q_n, _x(10), jnp.asarray([3, 0, 5, 2])))
    assert f"f32[{E},{K},{N}]" in fallback and "ragged_dot_general" in fallback


def test_traced_group_sizes_follow_lax_past_m():
    """Traced sizes summing past M: lax.ragged_dot cuts the last groups at M."""
    q = qkern.quantize(_w(), "int8", axis=-2)
    x = _x(6)
    sizes = jnp.asarray([2, 3, 4, 5])                      # sums to 14 > 6
    got = jax.jit(ragged)(q, x, sizes)
    want = jax.lax.ragged_dot(x, qkern.dequantize(q), sizes, precision="highest")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, loop_reference(x, q, [2, 3, 4, 5]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_grad_with_respect_to_x_matches_the_dense_reference(fmt):
    q = qkern.quantize(_w(), fmt, axis=-2)
    wd = qkern.dequantize(q)
    x = _x(11)
    g = jnp.asarray([4, 0, 1, 5])
    ct = jax.random.normal(jax.random.PRNGKey(5), (11, N))
    loss = lambda x: jnp.sum(ragged(q, x, g) * ct)
    dense_loss = lambda x: jnp.sum(jax.lax.ragged_dot(x, wd, g, precision="highest") * ct)
    got = jax.jit(jax.grad(loss))(x)
    want = jax.grad(dense_loss)(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.abs(np.asarray(got)[10]).max() == 0          # row past the sum: no gradient


def test_grad_inside_quaxify_and_the_weight_gets_no_gradient():
    q = qkern.quantize(_w(), "int4", axis=-2)
    g = jnp.asarray([2, 2, 2, 2])
    x = _x(8)
    f = qkern.quaxify(lambda q, x: jnp.sum(jax.lax.ragged_dot(x, q, g) ** 2))
    got = jax.grad(f, argnums=1)(q, x)
    want = jax.grad(lambda x: jnp.sum(jax.lax.ragged_dot(
        x, qkern.dequantize(q), g, precision="highest") ** 2))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_vmap_over_x():
    q = qkern.quantize(_w(), "nf4", axis=-2)
    xs = jax.random.normal(jax.random.PRNGKey(3), (3, 9, K))
    sizes = [2, 4, 0, 3]
    got = jax.vmap(ragged, in_axes=(None, 0, None))(q, xs, jnp.asarray(sizes))
    for b in range(3):
        _close(got[b], loop_reference(xs[b], q, sizes), jnp.float32, 10)


def test_vmap_over_group_sizes():
    q = qkern.quantize(_w(), "int8", axis=-2)
    x = _x(9)
    gs = jnp.asarray([[2, 4, 0, 3], [9, 0, 0, 0], [0, 0, 1, 1]])
    got = jax.jit(jax.vmap(ragged, in_axes=(None, None, 0)))(q, x, gs)
    for b in range(3):
        _close(got[b], loop_reference(x, q, gs[b]), jnp.float32, 10)


def test_nested_quaxify():
    q = qkern.quantize(_w(), "int8", axis=-2)
    x, sizes = _x(7), [1, 2, 3, 1]
    outer = qkern.quaxify(lambda q, x: ragged(q, x, jnp.asarray(sizes)) * 2)
    _close(outer(q, x), 2 * loop_reference(x, q, sizes), jnp.float32, 10)
    _close(jax.jit(outer)(q, x), 2 * loop_reference(x, q, sizes), jnp.float32, 10)


def test_transposed_contraction_and_lhs_layout():
    """ragged_dot_general contracting the experts' N axis runs x @ W_e.T from the same
    storage; an lhs stored [K, M] is taken in its own layout."""
    q = qkern.quantize(_w(), "nf4", axis=-2)
    sizes = [3, 1, 0, 2]
    dy = jax.random.normal(jax.random.PRNGKey(4), (6, N))
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    f = qkern.quaxify(lambda q, y, g: jax.lax.ragged_dot_general(y, q, g, dn))
    jaxpr = str(jax.make_jaxpr(f)(q, dy, jnp.asarray(sizes)))
    assert "ragged_dot_general" not in jaxpr
    _close(f(q, dy, jnp.asarray(sizes)), loop_reference(dy, q, sizes, transposed=True),
           jnp.float32, 10)
    # a weight quantised along its last axis is stored [E, N, K] blocked along K'=N: the
    # same transposed kernel runs for x @ W_e
    q_n = qkern.quantize(_w(), "int8", axis=-1)
    assert "ragged_dot_general" not in str(jax.make_jaxpr(ragged)(q_n, _x(6), jnp.asarray(sizes)))
    x = _x(6)
    dn_t = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (1,)), ((), ())),
                                             lhs_ragged_dimensions=[1], rhs_group_dimensions=[0])
    h = qkern.quaxify(lambda q, xt, g: jax.lax.ragged_dot_general(xt, q, g, dn_t))
    _close(h(q, x.T, jnp.asarray(sizes)), loop_reference(x, q, sizes), jnp.float32, 10)


def test_dtypes_as_dense():
    q = qkern.quantize(_w(), "int8", axis=-2)
    x = _x(5, dtype=jnp.bfloat16)
    g = jnp.asarray([1, 1, 1, 2])
    wd = qkern.dequantize(q)
    assert ragged(q, x, g).dtype == jax.lax.ragged_dot(x, wd, g).dtype == jnp.float32
    pref = qkern.quaxify(lambda q, x, g: jax.lax.ragged_dot(x, q, g,
                                                            preferred_element_type=jnp.bfloat16))
    assert pref(q, x, g).dtype == jnp.bfloat16


@pytest.mark.parametrize("case", ["blocks along N", "blocks along E", "QArray as x",
                                  "double quant", "zero points", "per tensor"])
def test_other_layouts_are_correct(case):
    w, x, sizes = _w(), _x(8), [3, 0, 4, 1]
    g = jnp.asarray(sizes)
    if case == "blocks along N":
        q = qkern.quantize(w, "int8", axis=-1)
    elif case == "blocks along E":
        q = qkern.quantize(w, "int8", axis=0)
    elif case == "double quant":
        q = qkern.quantize(w, "nf4", axis=-2, double_quant=True)
    elif case == "zero points":
        q = qkern.quantize(w, "int4", axis=-2, calibration="minmax")
    elif case == "per tensor":
        q = qkern.quantize(w, "int8", axis=None)
    else:
        q = qkern.quantize(w, "int8", axis=-2)
    if case == "QArray as x":
        qx = qkern.quantize(x, "int8")
        got = qkern.quaxify(lambda a, w, g: jax.lax.ragged_dot(a, w, g))(qx, w, g)
        want = jax.lax.ragged_dot(qkern.dequantize(qx), w, g, precision="highest")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        return
    _close(ragged(q, x, g), loop_reference(x, q, sizes), jnp.float32, 10)


def test_w8a8_quantises_each_row_as_the_2d_kernel_does():
    """act_fmt="int8": each row of x is quantised by its own absmax (or the static
    scale) and multiplied by its expert with the W8A8 kernel: the same numbers as the
    2-D W8A8 matmul of that row's group, and not the weight-only product."""
    w, x, sizes = _w(), _x(10), [3, 0, 4, 1]
    g = jnp.asarray(sizes)
    q = qkern.quantize(w, "int8", axis=-2, act_fmt="int8")
    got = np.asarray(jax.jit(ragged)(q, x, g))
    start = 0
    for e, n in enumerate(sizes):
        qe = qkern.quantize(w[e], "int8", act_fmt="int8")
        want = qkern.quaxify(lambda a, b: a @ b)(x[start:start + n], qe)
        np.testing.assert_allclose(got[start:start + n], want, rtol=1e-6, atol=1e-6)
        start += n
    assert np.abs(got[start:]).max() == 0
    weight_only = ragged(qkern.quantize(w, "int8", axis=-2), x, g)
    assert np.abs(got - np.asarray(weight_only)).max() > 1e-4
    static = qkern.quantize(w, "int8", axis=-2, act_fmt="int8")
    static = dataclasses.replace(static, act_scale=jnp.float32(0.05))
    got_s = np.asarray(ragged(static, x, g))
    qe = dataclasses.replace(qkern.quantize(w[0], "int8", act_fmt="int8"),
                             act_scale=jnp.float32(0.05))
    np.testing.assert_allclose(got_s[:3], qkern.quaxify(lambda a, b: a @ b)(x[:3], qe),
                               rtol=1e-6, atol=1e-6)
    dx = jax.grad(lambda x: jnp.sum(ragged(q, x, g)))(x)       # straight-through
    dx_wo = jax.grad(lambda x: jnp.sum(ragged(qkern.quantize(w, "int8", axis=-2), x, g)))(x)
    np.testing.assert_allclose(dx, dx_wo, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt, bits", [("int8", 8), ("nf4", 4), ("int4", 4)])
def test_storage_bytes_of_a_stacked_quantise(fmt, bits):
    e, k, n = 8, 256, 128
    q = qkern.quantize(_w(e, k, n), fmt, axis=-2)
    assert q.logical_shape == (e, k, n) and q.block_axis == 1
    codes = e * k * n * bits // 8
    assert codes <= q.nbytes() <= codes * 1.15          # codes plus per-expert scales
    assert q.nbytes() < e * k * n * 4 / (32 / bits) * 1.15


def test_save_load_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    q = qkern.quantize(_w(), "nf4", axis=-2)
    qkern.save(tmp_path / "moe.safetensors", {"experts": q})
    back = qkern.load(tmp_path / "moe.safetensors")["experts"]
    assert back.layout == q.layout and back.fmt == q.fmt
    x, g = _x(9), jnp.asarray([2, 3, 1, 3])
    np.testing.assert_array_equal(ragged(back, x, g), ragged(q, x, g))


def test_scan_over_layers_of_stacked_experts():
    """A [layers, E, K, N] stack quantised along K, scanned over its layers: each step's
    [E, K, N] piece runs the grouped kernel."""
    w = _w(3 * E, 64, 64).reshape(3, E, 64, 64) * 0.2
    q = qkern.quantize(w, "int4", axis=-2)
    x, g = _x(9, k=64), jnp.asarray([2, 3, 0, 4])

    def layers(q, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(jax.lax.ragged_dot(h, wl, g)), None),
                            x, q)[0]

    f = qkern.quaxify(layers)
    assert "ragged_dot_general" not in str(jax.make_jaxpr(f)(q, x))
    want = layers(qkern.dequantize(q), x)
    np.testing.assert_allclose(jax.jit(f)(q, x), want, rtol=1e-5, atol=1e-5)
