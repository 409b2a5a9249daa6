"""The native CPU kernels (qkern/pallas/qmatmul/_native), in the variant qkern picks (the
instruction-set variants: test_native_isa.py): built on this machine, used by the `xla`
backend at small M, right for every format they take, and out of the way where they
cannot run (larger M, wide vmaps, batched weights, other platforms, a failed build)."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import MatmulConfig, qmatmul
from qkern.pallas._operand import reference_dequantize
from qkern.pallas.qmatmul import _xla as qmatmul_xla
from qkern.pallas.qmatmul import _native
from qkern.pallas.qmatmul._native import _build

from .contract_qmatmul import assert_matches, make_case, reference_matmul

FORMATS = [
    ("nf4", {}),
    ("nf4", dict(block_size=None)),          # one block: shared lo/hi scale row
    ("fp4", {}),
    ("mxfp4", {}),
    ("int4", {}),
    ("int4", dict(calibration="minmax")),    # zero points
    ("int8", {}),
    ("int8", dict(block_size=64, calibration="minmax")),
    ("int3", {}),                            # emulated: one int8 per code
    ("fp8_e4m3", {}),
    ("fp8_e5m2", dict(block_size=64)),
    ("mxfp8", {}),
]
IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in FORMATS]


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def _uses_kernel(fn, *args) -> bool:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return any(t in hlo for t in ("qkern_packed4_gemv", "qkern_int8_gemv", "qkern_fp8_gemv"))


def test_kernels_build_on_this_machine():
    """Where there is an x86-64 CPU with AVX2 and FMA and a C++ compiler, the kernels must
    build; elsewhere `status()` must say why not."""
    can = (platform.machine().lower() in ("x86_64", "amd64") and _cpu_has("avx2")
           and _cpu_has("fma") and _cpu_has("f16c") and (shutil.which(os.environ.get("CXX", "c++")) is not None)
           and os.environ.get(_native.ENV_VAR, "1") != "0")
    status = _native.status()
    assert status.startswith("available" if can else "unavailable:"), status


needs_native = pytest.mark.skipif(_build.library() is None,
                                  reason=f"native kernels {_native.status()}")


@needs_native
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=IDS)
@pytest.mark.parametrize("m,k,n", [(1, 512, 256), (2, 300, 37), (1, 1000, 2100), (4, 192, 130),
                                   (7, 160, 72), (9, 128, 40), (17, 96, 24), (23, 200, 130),
                                   (40, 64, 48)])
def test_matches_reference(fmt, opts, m, k, n):
    x, _, op = make_case(fmt, opts, m, k, n, jnp.float32)
    fn = lambda x, op: qmatmul(x, op, backend="xla")
    assert _uses_kernel(fn, x, op) == (m <= _native.max_m(op))
    assert_matches(jax.jit(fn)(x, op), reference_matmul(x, op))


@needs_native
@pytest.mark.parametrize("fmt,opts,k", [("int4", {}, 384), ("nf4", dict(block_size=64), 320),
                                        ("fp4", dict(block_size=32), 96),
                                        ("int4", dict(calibration="minmax"), 300)],
                         ids=["int4-384", "nf4-b64-320", "fp4-b32-96", "int4-minmax-300"])
@pytest.mark.parametrize("m", [1, 3, 8, 17, 33])
def test_4bit_with_a_high_half_of_padding(fmt, opts, k, m):
    """An odd number of blocks is stored as one more (even_blocks), all padding: the last
    scale group's high nibbles hold no logical row and the kernel skips them (HighLive in
    qgemv.cc), streaming (M < 8) and tiled, columns past the last whole vector included.
    The live rows just before them (the high half of the groups before) must still count."""
    x, _, op = make_case(fmt, opts, m, k, 203, jnp.float32, seed=m)
    assert op.k_padded > op.k and op.num_blocks % 2 == 0
    assert (op.k_padded - op.k) >= op.block_size               # a whole block of padding
    fn = lambda x, op: qmatmul(x, op, backend="xla")
    assert _uses_kernel(fn, x, op)
    assert_matches(jax.jit(fn)(x, op), reference_matmul(x, op))


@needs_native
@pytest.mark.parametrize("fmt,opts,k", [("int4", {}, 384), ("nf4", dict(block_size=64), 320),
                                        ("int4", {}, 300)], ids=["int4-384", "nf4-320", "int4-300"])
@pytest.mark.parametrize("m", [1, 9])
def test_the_padding_high_half_is_not_read(fmt, opts, k, m):
    """Junk in the all-padding high half (codes, its scale row, x) changes nothing: the
    kernel skips it (streaming at M = 1, tiled at M = 9, the column tail at N = 203). The
    same junk in a live row does change the result."""
    x, _, op = make_case(fmt, opts, m, k, 203, jnp.float32, seed=m)
    name = "qkern_packed4_gemv"
    args, attrs = _native._weight_operands(op, name, 1)
    data, scales, table = args
    call = jax.ffi.ffi_call(_build.target(name, _native.variant()),
                            jax.ShapeDtypeStruct((m, op.n), jnp.float32))
    r, dead = op.data.shape[0], op.num_blocks - 1            # the last block: all padding
    x_pad = jnp.pad(x, ((0, 0), (0, op.k_padded - k)))
    clean = np.asarray(call(x_pad, data, scales, table, **attrs))
    rows = np.arange(r)
    high_dead = rows + r >= dead * op.block_size           # byte rows whose high nibble is there
    junk_data = jnp.where(high_dead[:, None], data | jnp.uint8(0x90), data)
    junk_scales = scales.at[dead].set(3.0)
    junk_x = x_pad.at[:, dead * op.block_size:].set(5.0)
    junk = np.asarray(call(junk_x, junk_data, junk_scales, table, **attrs))
    np.testing.assert_array_equal(junk, clean)
    live = np.asarray(call(x_pad.at[:, k - 1].set(50.0), data, scales, table, **attrs))
    assert not np.array_equal(live, clean)                   # the last logical row counts


@needs_native
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype):
    x, _, op = make_case("nf4", {}, 1, 512, 96, dtype)
    y = jax.jit(lambda x: qmatmul(x, op, backend="xla"))(x)
    assert y.dtype == dtype
    assert_matches(y, reference_matmul(x, op))


@needs_native
def test_two_threads_split_columns():
    # over 2**20 codes: the kernel splits the columns between threads (where there are two)
    x, _, op = make_case("int8", {}, 1, 1024, 1100, jnp.float32)
    assert op.data.size >= 1 << 20
    assert_matches(jax.jit(lambda x: qmatmul(x, op, backend="xla"))(x), reference_matmul(x, op))


@needs_native
def test_vmap_folds_small_batches_into_m_and_falls_back_for_wide_ones():
    x, qw, op = make_case("nf4", {}, 1, 256, 64, jnp.float32)
    f = lambda x: qmatmul(x, op, backend="xla")
    for batch in (2, 4, 17):
        xs = jnp.stack([x * (i + 1) for i in range(batch)])          # [B, 1, K]
        vf = jax.vmap(f)
        assert _uses_kernel(vf, xs) == (batch <= _native.max_m(op)), batch
        want = jnp.stack([reference_matmul(xi, op) for xi in xs])
        assert_matches(vf(xs), want)


@needs_native
def test_vmap_over_stacked_weights_runs_the_scan():
    k, n = 128, 48
    ops = [make_case("int4", {}, 1, k, n, jnp.float32, seed=s)[2] for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ops)
    x = jax.random.normal(jax.random.PRNGKey(4), (1, k))
    vf = jax.vmap(lambda op: qmatmul(x, op, backend="xla"))
    assert not _uses_kernel(vf, stacked)
    assert_matches(vf(stacked), jnp.stack([reference_matmul(x, op) for op in ops]))


@needs_native
def test_under_quaxify_grad_scan_and_cond():
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    w = jax.random.normal(ks[0], (384, 384)) * 0.05
    qw = qkern.quantize(w, "nf4")
    x = jax.random.normal(ks[1], (1, 384))
    dense = qw.materialise()

    def model(w, x, flag):
        def layer(h, _):
            return jnp.tanh(h @ w), None
        h, _ = jax.lax.scan(layer, x, None, length=3)
        return jax.lax.cond(flag, lambda h: h @ w, lambda h: -h, h).sum()

    q = jax.jit(qkern.quaxify(model))
    assert _uses_kernel(qkern.quaxify(model), qw, x, True)
    for flag in (True, False):
        np.testing.assert_allclose(q(qw, x, flag), model(dense, x, flag), rtol=2e-4, atol=2e-4)
    g = jax.jit(jax.grad(qkern.quaxify(model), argnums=1))(qw, x, True)
    np.testing.assert_allclose(g, jax.grad(model, argnums=1)(dense, x, True), rtol=1e-3, atol=1e-4)


@needs_native
@pytest.mark.parametrize("platforms", [["cuda"], ["cpu"], ["cpu", "cuda"]])
def test_exports_take_the_scan(platforms):
    # An exported module may only hold custom calls with compatibility guarantees (and the
    # kernel is CPU-only): the lowering takes the scan for jax.export, on every platform.
    x, _, op = make_case("nf4", {}, 1, 256, 64, jnp.float32)
    f = jax.jit(lambda x: qmatmul(x, op, backend="xla"))
    assert _uses_kernel(f, x)
    exp = jax.export.export(f, platforms=platforms)(x)
    text = exp.mlir_module()
    assert "qkern_packed4_gemv" not in text and "while" in text
    if "cpu" in platforms:
        assert_matches(exp.call(x), reference_matmul(x, op))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(_native.ENV_VAR, "0")
    x, _, op = make_case("nf4", {}, 1, 256, 64, jnp.float32)
    assert not _native.eligible(x, op)
    assert _native.status() == f"unavailable: {_native.ENV_VAR}=0"
    fn = lambda x, op: qmatmul(x, op, backend="xla")
    assert not _uses_kernel(fn, x, op)
    assert_matches(jax.jit(fn)(x, op), reference_matmul(x, op))


def test_failed_build_falls_back_to_the_scan(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(_build, "_state", {})
    monkeypatch.setenv("QKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false") or "false")
    x, _, op = make_case("int8", {}, 1, 128, 40, jnp.float32)
    with caplog.at_level("INFO", logger="qkern"):
        assert not _native.eligible(x, op)
    assert _native.status().startswith("unavailable:")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "failed" in _native.status()
        assert [r.levelname for r in caplog.records if "unavailable" in r.message] == ["WARNING"]
    assert_matches(jax.jit(lambda x: qmatmul(x, op, backend="xla"))(x), reference_matmul(x, op))


def test_formats_it_does_not_take_run_the_scan():
    import dataclasses
    x, _, op = make_case("int8", {}, 1, 256, 64, jnp.float32)
    custom = dataclasses.replace(op, fmt=dataclasses.replace(op.fmt, name="int8_custom"))
    assert _native._kernel_for(custom) is None and not _native.eligible(x, custom)


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_fp8_decodes_every_bit_pattern_as_astype(dtype):
    """All 256 codes, NaN, inf (e5m2), subnormals and -0 included, decode as
    `astype(float32)` does (the XLA path's decode): column n holds pattern n in row 0.
    Both storages: uint8 bit patterns (how qkern stores fp8 codes) and float8 arrays (QArrays
    built before that)."""
    for stored in ("uint8", "float8"):
        _check_fp8_bits(dtype, stored)


def _check_fp8_bits(dtype, stored):
    from qkern.formats import get_format
    from qkern.pallas._operand import QOperand
    fmt = get_format("fp8_e4m3" if dtype == jnp.float8_e4m3fn else "fp8_e5m2")
    bits = np.zeros((64, 256), np.uint8)
    bits[0] = np.arange(256, dtype=np.uint8)
    as_float8 = jax.lax.bitcast_convert_type(jnp.asarray(bits), dtype)
    codes = jnp.asarray(bits) if stored == "uint8" else as_float8
    op = QOperand(codes, jnp.ones((1, 256), jnp.float32), None, fmt, 64, 64)
    x = jnp.ones((1, 64), jnp.float32)
    fn = lambda x, op: qmatmul(x, op, backend="xla")
    assert _uses_kernel(fn, x, op)
    y = np.asarray(jax.jit(fn)(x, op))[0]
    want = np.asarray(as_float8[0].astype(jnp.float32))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(y[ok], want[ok])
    assert np.isnan(want).sum() == (2 if dtype == jnp.float8_e4m3fn else 6)
    assert dtype != jnp.float8_e5m2 or np.isinf(y).sum() == 2


@needs_native
def test_crossover_bench_runs_and_prints_the_table(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "native_crossover.py"
    spec = importlib.util.spec_from_file_location("native_crossover", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--m", "1,3", "--k", "256", "--n", "72", "--formats", "nf4,int8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| M | dense (ms) | nf4 native | nf4 scan | int8 native | int8 scan |" in out
    assert out.count("\n| 1 | ") == 1 and out.count("\n| 3 | ") == 1


@needs_native
def test_builds_from_scratch_into_an_empty_cache(monkeypatch, tmp_path):
    # what a fresh machine does on first use (the other tests may reuse a cached library)
    monkeypatch.setattr(_build, "_state", {})
    monkeypatch.setenv("QKERN_CACHE_DIR", str(tmp_path))
    v = _native.variant()
    path = _build.library_path(_build._compiler(), v)
    assert path.parent == tmp_path / "native"
    assert _native.status().startswith(f"available ({v}: ")
    assert _native.status().endswith(f"; {path})")
    (lib,) = (tmp_path / "native").glob("qgemv-*.so")                 # the loaded variant only
    umask = os.umask(0)
    os.umask(umask)
    assert lib.stat().st_mode & 0o777 == 0o755 & ~umask      # loadable by others too
    x, _, op = make_case("nf4", {}, 2, 256, 40, jnp.float32)
    assert_matches(jax.jit(lambda x: qmatmul(x, op, backend="xla"))(x), reference_matmul(x, op))


@needs_native
def test_kernel_refuses_inconsistent_shapes():
    # The Python side never passes these; the kernel still checks rather than read past
    # its buffers.
    x = jnp.ones((1, 64), jnp.float32)
    codes = jnp.zeros((16, 8), jnp.uint8)            # 32 logical rows, x has 64
    scales = jnp.ones((1, 8), jnp.float32)
    call = jax.ffi.ffi_call(_build.target("qkern_packed4_gemv", _native.variant()),
                            jax.ShapeDtypeStruct((1, 8), jnp.float32))
    with pytest.raises(Exception, match="inconsistent shapes"):
        jax.block_until_ready(call(x, codes, scales, jnp.zeros(16, jnp.float32),
                                   block_size=np.int64(64), threads=np.int64(1),
                                   k=np.int64(32)))
    # consistent shapes, but more logical rows than stored (or none)
    for k in (65, 0):
        with pytest.raises(Exception, match="inconsistent shapes"):
            jax.block_until_ready(call(x, jnp.zeros((32, 8), jnp.uint8), scales,
                                       jnp.zeros(16, jnp.float32), block_size=np.int64(64),
                                       threads=np.int64(1), k=np.int64(k)))


@needs_native
def test_nested_vmap_folds_both_batches():
    x, _, op = make_case("nf4", {}, 1, 256, 64, jnp.float32)
    f = jax.vmap(jax.vmap(lambda x: qmatmul(x, op, backend="xla")))
    for outer in (2, 12):                     # 2 x 3 rows: the kernel; 12 x 3 = 36 > 32: the scan
        xs = jnp.stack([jnp.stack([x * (i + 1) * (j + 2) for j in range(3)])
                        for i in range(outer)])                     # [outer, 3, 1, K]
        assert _uses_kernel(f, xs) == (outer * 3 <= _native.max_m(op))
        want = jnp.stack([jnp.stack([reference_matmul(xs[i, j], op) for j in range(3)])
                          for i in range(outer)])
        assert_matches(f(xs), want)


def test_thread_count_is_bounded(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    wide = make_case("int8", {}, 1, 1024, 4096, jnp.float32)[2]       # 4M codes
    assert _native._threads(wide) == 4096 // _native.MIN_COLUMNS         # 8, not 64
    huge = make_case("int8", {}, 1, 256, 65536, jnp.float32)[2]
    assert _native._threads(huge) == _native.MAX_THREADS
    small = make_case("int8", {}, 1, 256, 1024, jnp.float32)[2]        # under 1M codes
    assert _native._threads(small) == 1
    assert _native._threads(small, m=2) == 1                            # 0.5M codes x rows
    assert _native._threads(small, m=4) == 1024 // _native.MIN_COLUMNS   # 1M, streaming
    assert _native._threads(small, m=8) == 1024 // _native.NARROW_COLUMNS   # computing
    narrow = make_case("int8", {}, 1, 1536, 384, jnp.float32)[2]        # MiniLM's MLP down
    assert _native._threads(narrow, m=1) == 1
    assert _native._threads(narrow, m=32) == 384 // _native.NARROW_COLUMNS


def test_compiler_from_cxx_may_carry_arguments(monkeypatch):
    env = shutil.which("env")
    monkeypatch.setenv("CXX", "env c++ -v")
    assert _build._compiler() == [env, "c++", "-v"]
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert _build._compiler() is None


# -- dequantisation (dequantise-then-dot at large M) ------------------------------------
def _dequantize_targets(fn, *args) -> set:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return {t for t in _native._DEQUANTIZE.values() if t in hlo}


@needs_native
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=IDS)
@pytest.mark.parametrize("k,n", [(384, 1536), (100, 37), (1000, 2100)])
def test_dequantize_is_the_reference_bit_for_bit(fmt, opts, k, n):
    """value * scale, rounded as `reference_dequantize` rounds it, NaN codes included; 37
    and 2100 columns leave tails past whole vectors, K = 100 pads 4-bit blocks, 2100
    columns split between threads where there are two."""
    _, _, op = make_case(fmt, opts, 1, k, n, jnp.float32)
    want = np.asarray(reference_dequantize(op))
    got = jax.jit(qmatmul_xla.dequantized)(op)
    expect_native = op.zeros is None            # zero points: the reference
    assert bool(_dequantize_targets(qmatmul_xla.dequantized, op)) == expect_native
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_dequantize_reads_float8_arrays_of_older_qarrays(dtype):
    fmt = "fp8_e4m3" if dtype == jnp.float8_e4m3fn else "fp8_e5m2"
    _, _, op = make_case(fmt, {}, 1, 64, 40, jnp.float32)
    old = dataclasses.replace(op, data=jax.lax.bitcast_convert_type(op.data, dtype))
    got = jax.jit(qmatmul_xla.dequantized)(old)
    assert _dequantize_targets(qmatmul_xla.dequantized, old)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(reference_dequantize(op)))


@needs_native
@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp8_e4m3"])
def test_dequantize_then_dot_runs_the_native_decode(fmt):
    x, _, op = make_case(fmt, {}, 200, 384, 96, jnp.float32)
    fn = lambda x, op: qmatmul(x, op, backend="xla", config=MatmulConfig(dequantize=True))
    assert _dequantize_targets(fn, x, op)
    assert_matches(jax.jit(fn)(x, op), reference_matmul(x, op))
    g = jax.jit(jax.grad(lambda x: fn(x, op).sum()))(x)       # the backward dequantises too
    want = jax.grad(lambda x: reference_matmul(x, op).sum())(x)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


@needs_native
def test_dequantize_of_stacked_weights_under_vmap_and_scan_is_right():
    ops = [make_case("nf4", {}, 1, 128, 48, jnp.float32, seed=s)[2] for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ops)
    want = np.stack([np.asarray(reference_dequantize(op)) for op in ops])
    got = jax.jit(jax.vmap(qmatmul_xla.dequantized))(stacked)
    np.testing.assert_array_equal(np.asarray(got), want)
    _, scanned = jax.lax.scan(lambda c, op: (c, qmatmul_xla.dequantized(op)), 0, stacked)
    np.testing.assert_array_equal(np.asarray(scanned), want)


@needs_native
def test_dequantize_runs_just_before_its_dot():
    """Each layer's weight is decoded once that layer's x exists, so the decoded weights of
    a stack are never live together: the program's temporary buffer stays near one
    layer's weight, not the sum of all of them (all-MiniLM-L6-v2 at batch 32: 17 MB, not
    55 MB, which glibc maps afresh on every call)."""
    layers, k = 8, 512
    qws = [qkern.quantize(jax.random.normal(jax.random.PRNGKey(i), (k, k)) * 0.05, "int8")
           for i in range(layers)]
    x = jax.random.normal(jax.random.PRNGKey(9), (256, k))   # M = 256: dequantise-then-dot

    def model(ws, x):
        for w in ws:
            x = jnp.tanh(x @ w)
        return x

    f = jax.jit(qkern.quaxify(model))
    compiled = f.lower(qws, x).compile()
    assert compiled.as_text().count("qkern_int8_dequantize") == layers
    one_weight = k * k * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * one_weight
    want = model([w.materialise() for w in qws], x)
    np.testing.assert_allclose(f(qws, x), want, rtol=2e-5, atol=2e-5)


@needs_native
def test_dequantize_under_vmap_of_x_decodes_one_weight():
    _, _, op = make_case("nf4", {}, 1, 256, 64, jnp.float32)
    xs = jax.random.normal(jax.random.PRNGKey(3), (3, 200, 256))
    fn = jax.vmap(lambda x: qmatmul(x, op, backend="xla", config=MatmulConfig(dequantize=True)))
    hlo = jax.jit(fn).lower(xs).compile().as_text()
    assert hlo.count("qkern_packed4_dequantize") == 1
    assert_matches(jax.jit(fn)(xs), jnp.stack([reference_matmul(x, op) for x in xs]))
