"""`qkern.quantize(..., compute_dtype=...)`: matmuls, convolutions and ragged dots against
the weight compute in that dtype (x and the decoded weight cast to it, float32
accumulation) and return dense JAX's result dtype; the field survives rules, GPTQ, QAT,
sharding specs, checkpoints and jax transforms; bad values fail naming what is allowed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

K, N = 384, 200


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def weights(k=K, n=N, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (k, n), jnp.float32)


def acts(m, k=K, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (m, k), jnp.float32).astype(dtype)


def in_dtype(x, q, dtype):
    """The reference: x and the dequantised weight rounded to `dtype`, float32 sums."""
    w = qkern.dequantize(q).astype(jnp.float32)
    return jnp.dot(x.astype(dtype).astype(jnp.float32), w.astype(dtype).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)


def exact(x, q):
    return jnp.dot(x.astype(jnp.float32), qkern.dequantize(q).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)


def assert_in_bfloat16(fn, x, q):
    """`fn(x, q)` under quaxify: float32 out, and as far from the float32 product as the
    bfloat16 one is near."""
    y = jax.jit(qkern.quaxify(fn))(x, q)
    wd = qkern.dequantize(q)
    ref_b = fn(x.astype(jnp.bfloat16), wd.astype(jnp.bfloat16)).astype(jnp.float32)
    assert y.dtype == jnp.float32
    assert rel(y, fn(x, wd)) > 1e-5 and rel(y, ref_b) < 2e-2


# On a CPU: M = 1 and 5, the native kernel; 100, the xla backend's scan; 1024,
# dequantise-then-dot (elsewhere the Pallas kernels).
@pytest.mark.parametrize("m", [1, 5, 100, 1024])
@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("cdt", ["bfloat16", "float16"])
def test_float32_x_computes_in_the_compute_dtype(m, fmt, cdt):
    q = qkern.quantize(weights(), fmt, compute_dtype=cdt)
    x = acts(m)
    y = jax.jit(qkern.quaxify(lambda x, w: x @ w))(x, q)
    assert y.dtype == jnp.float32                     # dense JAX's result dtype
    ref = exact(x, q)
    # x rounded to the compute dtype: further from the float32 product than float32
    # summation order could make it, and within that dtype's rounding of x and W
    assert rel(y, ref) > 1e-5
    assert rel(y, in_dtype(x, q, cdt)) < (2e-2 if cdt == "bfloat16" else 3e-3)
    # and the same weight without a compute dtype computes in float32
    q32 = dataclasses.replace(q, compute_dtype=None)
    assert rel(jax.jit(qkern.quaxify(lambda x, w: x @ w))(x, q32), ref) < 1e-5


def dot_dtypes(fn, *args):
    """The operand dtypes of every dot_general in `fn`'s lowered program."""
    hlo = jax.jit(fn).lower(*args).as_text()
    return [l.split("->")[0] for l in hlo.splitlines() if "dot_general" in l]


@pytest.mark.parametrize("m", [7, 100, 1024])
def test_float32_compute_dtype_widens_bfloat16_x(m):
    q = qkern.quantize(weights().astype(jnp.bfloat16), "nf4", compute_dtype="float32")
    x = acts(m, dtype=jnp.bfloat16)
    mm = qkern.quaxify(lambda x, w: x @ w)
    y = jax.jit(mm)(x, q)
    assert y.dtype == jnp.bfloat16                    # x @ W of two bfloat16 arrays
    assert rel(y, exact(x, q)) < 8e-3                 # rounded once, at the end
    # no bfloat16 product anywhere (M = 7 runs the native kernel: no dot at all)
    assert not any("bf16>" in d for d in dot_dtypes(mm, x, q))
    if m > 7:          # while without the compute dtype, two bfloat16 arrays multiply so
        q16 = dataclasses.replace(q, compute_dtype=None)
        assert any("bf16>" in d for d in dot_dtypes(mm, x, q16))


def test_transforms_keep_the_compute_dtype():
    q = qkern.quantize(weights(), "nf4", compute_dtype="bfloat16")
    x = acts(6)
    f = qkern.quaxify(lambda x, w: jnp.tanh(x @ w).sum())
    g = jax.jit(jax.grad(f))(x, q)
    # the gradient: dy @ W.T in bfloat16, returned in x's dtype
    dy = 1 - jnp.tanh(exact(x, q)) ** 2
    g_ref = dy @ qkern.dequantize(q).T
    assert g.dtype == jnp.float32 and rel(g, g_ref) < 3e-2
    # vmap, scan, cond
    xs = jnp.stack([acts(3, seed=s) for s in range(4)])
    mm = qkern.quaxify(lambda x_, w: x_ @ w)
    y_v = jax.jit(jax.vmap(mm, in_axes=(0, None)))(xs, q)
    assert rel(y_v, jnp.stack([in_dtype(x_, q, "bfloat16") for x_ in xs])) < 2e-2

    def scanned(xs, w):
        return jax.lax.scan(lambda c, x_: (c, x_ @ w), 0.0, xs)[1]
    y_s = jax.jit(qkern.quaxify(scanned))(xs, q)
    # (other row counts may take other kernels: their float32 sums differ in the last
    # bits, which the bfloat16 result can round one step apart)
    assert rel(y_s, y_v) < 8e-3
    assert rel(y_s[1], exact(xs[1], q)) > 1e-5        # in bfloat16 inside the scan too
    y_c = jax.jit(qkern.quaxify(lambda p, x_, w: jax.lax.cond(p, lambda: x_ @ w,
                                                              lambda: -(x_ @ w))))(False, xs[0], q)
    assert rel(y_c, -y_v[0]) < 8e-3
    assert rel(y_c, -exact(xs[0], q)) > 1e-5          # and inside cond
    assert rel(y_v[0], exact(xs[0], q)) > 1e-5        # all of them really in bfloat16
    # a transpose and a cast keep the field
    qt = qkern.quaxify(lambda w: w.T.T)(q)
    assert qt.compute_dtype == np.dtype(jnp.bfloat16)
    qc = qkern.quaxify(lambda w: w.astype(jnp.bfloat16))(q)
    assert isinstance(qc, qkern.QArray) and qc.compute_dtype == np.dtype(jnp.bfloat16)


def test_nested_quaxify_and_stacked_layers():
    ws = jnp.stack([weights(n=K, seed=s) / np.sqrt(K) for s in range(3)])
    q = qkern.quantize({"w": ws}, "nf4", where="w", compute_dtype="bfloat16")["w"]
    assert q.compute_dtype == np.dtype(jnp.bfloat16)
    x = acts(2)

    def model(x, q):
        def layer(h, w):
            return qkern.quaxify(lambda h, w: h @ w)(h, w), None
        return jax.lax.scan(layer, x, q)[0]
    y = jax.jit(qkern.quaxify(qkern.quaxify(model)))(x, q)
    h = x
    for i in range(3):                              # float32 throughout
        h = jnp.dot(h, qkern.dequantize(q)[i], precision=jax.lax.Precision.HIGHEST)
    assert 1e-5 < rel(y, h) < 5e-2


def test_convolution_computes_in_the_compute_dtype():
    w = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 32, 16), jnp.float32)
    q = qkern.quantize(w, "int8", axis=2, compute_dtype="bfloat16")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 10, 10, 32), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    assert_in_bfloat16(conv, x, q)


def test_lora_on_a_base_with_a_compute_dtype():
    q = qkern.quantize(weights(), "nf4", compute_dtype="bfloat16")
    lw = qkern.loraify({"w": q}, 4, jax.random.PRNGKey(5))["w"]
    lw = dataclasses.replace(lw, b=jax.random.normal(jax.random.PRNGKey(6), lw.b.shape))
    for m in (5, 100):             # the fused kernel; and the scan
        x = acts(m)
        y = jax.jit(qkern.quaxify(lambda x, w: x @ w))(x, lw)
        assert y.dtype == jnp.float32
        ref = jnp.dot(x, lw.materialise(), precision=jax.lax.Precision.HIGHEST)
        assert 1e-5 < rel(y, ref) < 2e-2
    # merged back and requantised, the weight keeps its compute dtype
    merged = qkern.lora.merge({"w": lw}, requantize=True)["w"]
    assert merged.compute_dtype == np.dtype(jnp.bfloat16)


def test_rules_report_gptq_and_qat_carry_it():
    params = {"a": {"kernel": weights()}, "b": {"kernel": weights(seed=2)}}
    rules = [qkern.Rule(r"a/kernel", "nf4", compute_dtype=jnp.bfloat16),
             qkern.Rule(r"b/kernel", "int8")]
    qp, rep = qkern.quantize(params, rules=rules, report=True)
    assert qp["a"]["kernel"].compute_dtype == np.dtype(jnp.bfloat16)
    assert qp["b"]["kernel"].compute_dtype is None
    assert "compute bfloat16" in str(rep)
    assert "compute_dtype='bfloat16'" in rules[0].describe()
    h = {"a/kernel": jnp.eye(K), "b/kernel": jnp.eye(K)}
    qg = qkern.quantize(params, rules=rules, gptq=qkern.GPTQ(h))
    assert qg["a"]["kernel"].compute_dtype == np.dtype(jnp.bfloat16)
    q1 = qkern.quantize(weights(), "int4", gptq=jnp.eye(K), compute_dtype="float16")
    assert q1.compute_dtype == np.dtype(jnp.float16)
    fq = qkern.fake_quant(params, rules=rules, kernels=True)
    assert fq["a"]["kernel"].quantised().compute_dtype == np.dtype(jnp.bfloat16)
    assert "compute_dtype=bfloat16" in repr(qp["a"]["kernel"])


def test_checkpoints_keep_it_and_old_files_load(tmp_path):
    pytest.importorskip("safetensors")
    tree = {"a": qkern.quantize(weights(), "nf4", compute_dtype="bfloat16"),
            "b": qkern.quantize(weights(seed=2), "int8")}
    qkern.save(tmp_path / "m.safetensors", tree)
    back = qkern.load(tmp_path / "m.safetensors")
    assert back["a"].compute_dtype == np.dtype(jnp.bfloat16)
    assert back["b"].compute_dtype is None
    import json
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        header = json.loads(f.metadata()["qkern"])
    statics = {e["path"]: e["static"] for e in header["leaves"]}
    # unset: not written, so the file reads as before the field existed
    assert "compute_dtype" not in statics["b"] and statics["a"]["compute_dtype"] == "bfloat16"


def test_sharding_specs_keep_it():
    q = qkern.quantize(weights(), "int8", compute_dtype="bfloat16")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    specs = qkern.partition_specs({"w": q}, {"w": jax.sharding.PartitionSpec(None, "x")}, mesh)
    assert specs["w"].compute_dtype == np.dtype(jnp.bfloat16)


@pytest.mark.parametrize("bad", ["int8", "float64", "bf16", 3, jnp.int4])
def test_bad_compute_dtypes_name_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        qkern.quantize(weights(), "nf4", compute_dtype=bad)
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        qkern.Rule(r".*", "nf4", compute_dtype=bad)


def test_w8a8_and_a_compute_dtype_do_not_combine():
    with pytest.raises(ValueError, match="W8A8"):
        qkern.quantize(weights(), "int8", act_fmt="int8", compute_dtype="bfloat16")
    with pytest.raises(TypeError, match="rules="):
        qkern.quantize({"w": weights()}, compute_dtype="bfloat16",
                       rules=[qkern.Rule(r"w", "int8")])


def test_ragged_dot_computes_in_the_compute_dtype():
    w = jnp.stack([weights(seed=s) for s in range(3)])              # [E, K, N]
    q = qkern.quantize(w, "int8", axis=1, compute_dtype="bfloat16")
    x = acts(10)
    sizes = jnp.array([3, 0, 7], jnp.int32)
    y = jax.jit(qkern.quaxify(jax.lax.ragged_dot))(x, q, sizes)
    wd = qkern.dequantize(q)
    ref = jax.lax.ragged_dot(x, wd, sizes, precision=jax.lax.Precision.HIGHEST)
    ref_b = jax.lax.ragged_dot(x.astype(jnp.bfloat16), wd.astype(jnp.bfloat16), sizes,
                               preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32
    assert rel(y, ref) > 1e-5 and rel(y, ref_b) < 2e-2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the xla backend's own paths")
@pytest.mark.parametrize("m", [100, 1024])
def test_large_m_multiplies_in_bfloat16_on_the_xla_backend(m):
    """Above the native kernel's rows, the scan (M = 100) and dequantise-then-dot (1024)
    run XLA's bfloat16 dot, the forward and the gradient's: the speed of bfloat16
    compute on a CPU with AMX."""
    q = qkern.quantize(weights(), "nf4", compute_dtype="bfloat16")
    f = qkern.quaxify(lambda x, w: (x @ w).sum())
    for fn in (f, jax.grad(f)):
        hlo = jax.jit(fn).lower(acts(m), q).as_text()
        dots = [l for l in hlo.splitlines() if "dot_general" in l]
        assert dots and all("xbf16>" in l.split("->")[0] for l in dots), dots


def test_transposed_product_with_zero_points_in_bfloat16():
    """x @ W.T (the gradient's direction) in bfloat16 with per-channel zero points: the
    zero-point term comes from the same rounded x as the product, so the two cancel as in
    float32 (a mismatch made the outputs of the weights near their zero point 30x less
    accurate than the dense bfloat16 product)."""
    k, n, m = 512, 256, 100
    w = 0.01 * jax.random.normal(jax.random.PRNGKey(0), (k, n))
    w = w.at[0].set(1.0).at[1].set(-0.3)
    x = acts(m, k=n)
    for fmt in ("int4", "int8"):
        q = qkern.quantize(w, fmt, calibration="minmax", block_size=k, compute_dtype="bfloat16")
        y = jax.jit(qkern.quaxify(lambda x, w: x @ w.T))(x, q)
        ref = jnp.dot(x, qkern.dequantize(q).T, precision=jax.lax.Precision.HIGHEST)
        small = slice(2, None)          # the rows of W near their zero point
        assert rel(y[:, small], ref[:, small]) < 1e-2, fmt     # dense bfloat16: 5e-3
        g = jax.jit(jax.grad(qkern.quaxify(lambda x, w: jnp.sum(x @ w))))(acts(m, k=k), q)
        g_ref = jnp.broadcast_to(jnp.sum(qkern.dequantize(q), axis=1), g.shape)
        assert rel(g[:, small], g_ref[:, small]) < 1e-2, fmt


@pytest.mark.parametrize("case", ["einsum 3-D kernel", "batched dot_general"])
def test_layouts_without_a_kernel_still_compute_in_it(case):
    if case == "einsum 3-D kernel":     # Flax DenseGeneral: [in, heads, head_dim]
        w = jax.random.normal(jax.random.PRNGKey(0), (K, 4, 50))
        fn = lambda x, w: jnp.einsum("mk,khd->mhd", x, w)
        x = acts(6)
    else:
        w = jax.random.normal(jax.random.PRNGKey(0), (3, K, 40))
        fn = lambda x, w: jnp.einsum("emk,ekn->emn", x, w)
        x = jnp.stack([acts(6, seed=s) for s in range(3)])
    q = qkern.quantize(w, "nf4", axis=1 if w.shape[0] == 3 else 0, compute_dtype="bfloat16")
    assert_in_bfloat16(fn, x, q)


def test_fake_quant_single_array_and_merge_keep_it():
    w = weights()
    fq = qkern.fake_quant(w, "nf4", kernels=True, compute_dtype="bfloat16")
    assert fq.quantised().compute_dtype == np.dtype(jnp.bfloat16)
    x = acts(100)
    served = jax.jit(qkern.quaxify(lambda x, w: x @ w))(
        x, qkern.quantize(w, "nf4", compute_dtype="bfloat16"))
    trained = jax.jit(qkern.quaxify(lambda x, w: x @ w))(x, fq)
    np.testing.assert_array_equal(np.asarray(served), np.asarray(trained))
    with pytest.raises(TypeError, match="kernels=True"):
        qkern.fake_quant(w, "nf4", compute_dtype="bfloat16")
    lw = qkern.loraify({"w": qkern.quantize(w, "nf4", compute_dtype="bfloat16")}, 4,
                       jax.random.PRNGKey(1))
    assert qkern.lora.merge(lw, requantize="int8")["w"].compute_dtype == np.dtype(jnp.bfloat16)


def test_checkpoint_with_a_compute_dtype_is_version_3(tmp_path):
    pytest.importorskip("safetensors")
    import json
    from safetensors import safe_open
    for cd, version in ((None, 1), ("bfloat16", 3)):
        qkern.save(tmp_path / "m.safetensors", {"a": qkern.quantize(weights(), "nf4",
                                                                     compute_dtype=cd)})
        with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
            assert json.loads(f.metadata()["qkern"])["version"] == version
