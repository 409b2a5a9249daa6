"""The native CPU kernels' blocked GEMM (qgemv.cc, from `_native.GEMM_FROM` rows of x):
numerics against the reference in both instruction-set variants, the same bits whatever
the variant or thread count, where it runs in a program (jit, vmap, scan, grad) and where
it does not (bfloat16 x, the transposed direction, small weights from M = 128), and the
unpadded x it takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import qmatmul
from qkern.pallas._config import Problem, config_for
from qkern.pallas.qmatmul import _native
from qkern.pallas.qmatmul._native import _build

from .contract_qmatmul import assert_matches, make_case, reference_matmul
from .test_native_isa import RUNNABLE, _targets, isa, needs_native  # noqa: F401 (fixture)

GEMM_FORMATS = [
    ("nf4", {}),
    ("nf4", dict(block_size=None)),           # one scale row for both nibble halves
    ("int4", {}),                             # blocks of 128: K = 384 stored as 512 rows
    ("int4", dict(calibration="minmax")),     # zero points (the caller's correction)
    ("fp4", {}),
    ("mxfp4", {}),
    ("int8", {}),
    ("int8", dict(block_size=64)),            # K = 300: stored rows padded to 320
    ("int3", {}),                             # emulated: one int8 per code
    ("fp8_e4m3", {}),
    ("fp8_e5m2", dict(block_size=64)),
    ("mxfp8", {}),
]
GEMM_IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in GEMM_FORMATS]
# (M, K, N): 49 rows (the first GEMM row, 3 x 14 + 7: a partial micro tile) split by
# columns; 63 rows and 37 columns (tails past whole vectors and micro tiles); K = 384 and
# 300 (an all-padding or partly live high half of 4-bit codes); K = 1000 (four depth
# blocks, the last partial); 600 and 1100 rows against fewer columns (split by rows; 1100:
# three row blocks per thread where one thread runs); 49 rows, 5 columns (split by rows,
# fewer columns than a vector)
GEMM_SHAPES = [(49, 384, 384), (63, 300, 37), (64, 1000, 300), (600, 200, 50),
               (1100, 96, 40), (49, 130, 5)]


@pytest.mark.parametrize("fmt,opts", GEMM_FORMATS, ids=GEMM_IDS)
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_gemm_matches_reference(isa, fmt, opts, m, k, n):
    x, _, op = make_case(fmt, opts, m, k, n, jnp.float32)
    # the variant named (the AVX2 build has the GEMM too, though max_m does not pick it)
    y = jax.jit(lambda x: _native._native(x, op, isa=isa))(x)
    assert_matches(y, reference_matmul(x, op))


@needs_native
@pytest.mark.parametrize("fmt,opts", [("nf4", {}), ("int4", {}), ("int8", dict(block_size=64)),
                                      ("fp8_e4m3", {})], ids=str)
def test_gemm_bits_do_not_depend_on_variant_or_threads(fmt, opts, monkeypatch):
    """Per element of y the sum runs over K in the same depth blocks, in the same order,
    whatever the variant (micro tiles of 14 or 6 rows, 32 or 16 columns; every variant
    this CPU runs), the split between threads (rows or columns) or their number."""
    for m, k, n in [(200, 520, 300), (700, 384, 100)]:     # split by columns, then rows
        x, _, op = make_case(fmt, opts, m, k, n, jnp.float32)
        ys = []
        for threads in (1, 2, 3):
            monkeypatch.setattr(_native, "_threads", lambda op, m, t=threads: t)
            for v in RUNNABLE:
                monkeypatch.setenv(_build.ISA_VAR, v)          # loads (registers) variant v
                assert _native.variant() == v, _native.status()
                ys.append(np.asarray(jax.jit(lambda x, v=v: _native._native(x, op, isa=v))(x)))
        for y in ys[1:]:
            np.testing.assert_array_equal(y, ys[0])


@needs_native
@pytest.mark.parametrize("m", [_native.GEMM_FROM, 64, 127])
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8", "fp8_e4m3"])
def test_quaxified_float32_matmuls_run_the_gemm(fmt, m):
    """From 49 rows (AVX-512) x @ qw runs the native kernel: no scan, no dequantise-then-
    dot (below M = 128 for small weights), under jit and quaxify; the result matches the
    reference."""
    if _native.variant() != "avx512":
        pytest.skip(f"the GEMM is chosen on AVX-512 only (loaded: {_native.variant()})")
    x, qw, op = make_case(fmt, {}, m, 384, 200, jnp.float32)
    f = qkern.quaxify(lambda x, w: x @ w)
    hlo = jax.jit(f).lower(x, qw).compile().as_text()
    assert f"{_native._kernel_for(op)}_avx512" in hlo
    assert "dequantize" not in hlo and "while" not in hlo
    assert_matches(jax.jit(f)(x, qw), reference_matmul(x, op))


@needs_native
def test_bfloat16_x_above_48_rows_does_not_run_the_native_kernel():
    """compute_dtype="bfloat16" above the tiled kernel's 48 rows: XLA's bfloat16 dot
    (AMX) beats any float32 kernel, so dequantise-then-dot or the bfloat16 scan runs."""
    x, qw, op = make_case("nf4", dict(compute_dtype="bfloat16"), 64, 384, 200, jnp.float32)
    f = qkern.quaxify(lambda x, w: x @ w)
    assert not _targets(f, x, qw)
    _, qw32, _ = make_case("nf4", {}, 64, 384, 200, jnp.float32)   # float32 compute: it does
    assert _targets(f, x, qw32) == ({"qkern_packed4_gemv_avx512"}
                                    if _native.variant() == "avx512" else set())
    assert not _native.runs_for(64, op, jnp.bfloat16)
    assert _native.runs_for(48, op, jnp.bfloat16) and _native.runs_for(64, op, jnp.float32)


@needs_native
def test_gemm_under_vmap_scan_cond_and_grad():
    if _native.variant() != "avx512":
        pytest.skip(f"the GEMM is chosen on AVX-512 only (loaded: {_native.variant()})")
    x, qw, op = make_case("nf4", {}, 60, 256, 96, jnp.float32)
    xs = jnp.stack([x, 2 * x, -x])                                  # vmap: 3 x 60 = 180 rows
    mm = qkern.quaxify(lambda x, w: x @ w)
    vf = jax.vmap(mm, in_axes=(0, None))
    assert _targets(vf, xs, qw) == {"qkern_packed4_gemv_avx512"}
    assert_matches(jax.jit(vf)(xs, qw), jax.vmap(reference_matmul, (0, None))(xs, op))

    def body(c, xi):                                                # lax.scan and lax.cond
        y = jax.lax.cond(xi[0, 0] > 0, lambda: mm(xi, qw), lambda: -mm(xi, qw))
        return c + y.sum(), y
    _, ys = jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs))(xs)
    sign = jnp.where(xs[:, 0, 0] > 0, 1.0, -1.0)[:, None, None]
    assert_matches(ys, sign * jax.vmap(reference_matmul, (0, None))(xs, op))

    g = jax.jit(jax.grad(lambda x: (mm(x, qw) ** 2).sum()))(x)     # dy @ W.T: not native
    w = qw.materialise()
    hi = jax.lax.Precision.HIGHEST
    assert_matches(g, 2 * jnp.dot(jnp.dot(x, w, precision=hi), w.T, precision=hi))


@needs_native
def test_unpadded_x_is_taken_only_by_the_gemm():
    """4-bit codes store K = 384 in blocks of 128 as 512 rows. x[M, 384] (not padded to
    512, which cost a copy of x) is accepted from GEMM_FROM rows, refused below."""
    for m in (_native.GEMM_FROM - 1, _native.GEMM_FROM):
        x, _, op = make_case("int4", {}, m, 384, 64, jnp.float32)
        assert op.k_padded == 512
        args, attrs = _native._weight_operands(op, "qkern_packed4_gemv", 1)
        call = jax.ffi.ffi_call(_native.target("qkern_packed4_gemv", _native.variant()),
                                jax.ShapeDtypeStruct((m, op.n), jnp.float32))
        if m < _native.GEMM_FROM:
            with pytest.raises(Exception, match="inconsistent shapes"):
                jax.block_until_ready(call(x, *args, **attrs))
        else:
            assert_matches(call(x, *args, **attrs), reference_matmul(x, op))


@needs_native
def test_where_the_gemm_runs_and_where_dequantise_then_dot_stays(monkeypatch):
    """Nothing tuned, float32 x, AVX-512: from 49 rows the GEMM replaces the scan (to
    M = 127, and for weights above SMALL_WEIGHT_BYTES in float32 at any M); small weights
    from M = 128 keep dequantise-then-dot (XLA's dot, which balances its work over busy
    cores better: docs/benchmarks.md, "The native GEMM")."""
    if _native.variant() != "avx512":
        pytest.skip(f"the GEMM is chosen on AVX-512 only (loaded: {_native.variant()})")
    from qkern.pallas import _config
    monkeypatch.setattr(_config, "LOOKUPS", [])                    # no autotune cache
    f = qkern.quaxify(lambda x, w: x @ w)
    for m, k, n, native in [(127, 384, 256, True), (128, 384, 256, False),
                            (128, 2048, 1100, True)]:          # 2048 x 1100 x 4 B > 8 MB
        x, qw, op = make_case("int8", {}, m, k, n, jnp.float32)
        assert config_for(Problem.of("xla", x, op, "qmatmul")).dequantize == (not native)
        hlo = jax.jit(f).lower(x, qw).compile().as_text()
        assert ("qkern_int8_gemv_avx512" in hlo) == native, (m, k, n)
        assert ("qkern_int8_dequantize" in hlo) == (not native), (m, k, n)
        assert "while" not in hlo                                      # never the scan
