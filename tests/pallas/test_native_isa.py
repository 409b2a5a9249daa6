"""The native CPU kernels' instruction-set variants (qkern/pallas/qmatmul/_native/_build.py):
every variant this CPU runs gives the XLA reference's results, `$QKERN_NATIVE_ISA` picks
the loaded variant (and a value naming none is refused, with the valid ones named), and
every variant compiles here, whether or not this CPU runs it."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import qmatmul
from qkern.pallas._operand import stored_operand
from qkern.pallas.qmatmul import _native
from qkern.pallas.qmatmul._native import _build

from .contract_qmatmul import assert_matches, make_case, reference_matmul
from .test_native import FORMATS, IDS

X86 = platform.machine().lower() in ("x86_64", "amd64")
RUNNABLE = _build.runnable_variants() if X86 else []
needs_native = pytest.mark.skipif(_build.library() is None,
                                  reason=f"native kernels {_native.status()}")


def _targets(fn, *args) -> set[str]:
    """The native FFI targets the compiled `fn` calls."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return {f"{name}_{v}" for name in _build.TARGETS.values() for v in _build.VARIANTS
            if f"{name}_{v}" in hlo}


@pytest.fixture(params=list(_build.VARIANTS))
def isa(request, monkeypatch):
    """Each variant, capped to by the environment; skipped where this CPU cannot run it."""
    if request.param not in RUNNABLE or _build.library() is None:
        pytest.skip(f"this CPU does not run the {request.param} variant "
                    f"(runs: {', '.join(RUNNABLE) or 'none'})")
    monkeypatch.setenv(_build.ISA_VAR, request.param)
    assert _native.variant() == request.param, _native.status()
    return request.param


@pytest.mark.parametrize("fmt,opts", FORMATS, ids=IDS)
@pytest.mark.parametrize("m,k,n", [(1, 1000, 2100), (2, 300, 37), (7, 160, 72),
                                   (31, 200, 300), (13, 1000, 2100)])
def test_matches_reference(isa, fmt, opts, m, k, n):
    # 2100 and 37 columns leave tails past whole vectors of 8 and 16; 7 rows of x take the
    # streaming kernel's four-, two- and one-row paths, 13 and 31 the tiled kernel's 16-
    # (AVX-512), 8-, 4-, 2- and 1-row ones (31 also a second thread, 300 columns over two
    # 128-column threads where there are two); 1000 rows split over two threads where there
    # are two, and take the tiled kernel through several chunks of code rows and blocks
    x, _, op = make_case(fmt, opts, m, k, n, jnp.float32)
    fn = lambda x, op: qmatmul(x, op, backend="xla")
    want = {f"{_native._kernel_for(op)}_{isa}"} if m <= _native.max_m(op) else set()
    assert _targets(fn, x, op) == want
    assert_matches(jax.jit(fn)(x, op), reference_matmul(x, op))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_fp8_decodes_every_bit_pattern_as_astype(isa, dtype):
    from .test_native import test_fp8_decodes_every_bit_pattern_as_astype as check
    check(dtype)


@pytest.mark.parametrize("fmt,opts", [("nf4", {}), ("int4", dict(calibration="minmax")),
                                      ("int8", {}), ("fp8_e4m3", {}),
                                      ("int8", dict(block_size=None))], ids=str)
@pytest.mark.parametrize("m,k,n", [(3, 512, 200), (13, 512, 200), (16, 512, 200),
                                   (9, 2048, 2100)])
def test_variants_give_identical_results(monkeypatch, fmt, opts, m, k, n):
    """The variants pick the same kernel and do the same float32 operations in the same
    order per column (200 columns: a tail past the last whole vector of 16). 3 rows of x:
    the streaming kernel; 13 and 16: the tiled one (16: one pass of 16 rows on AVX-512, two
    of 8 on AVX2); 9 rows against 2048 x 2100 codes: tiled, except int8, which streams
    weights over 4 Mi codes."""
    if len(RUNNABLE) < 2 or _build.library() is None:
        pytest.skip(f"this CPU runs one variant at most ({', '.join(RUNNABLE) or 'none'})")
    x, _, op = make_case(fmt, opts, m, k, n, jnp.float32)
    outs = []
    for v in RUNNABLE:
        monkeypatch.setenv(_build.ISA_VAR, v)
        outs.append(np.asarray(jax.jit(lambda x: qmatmul(x, op, backend="xla"))(x)))
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@needs_native
def test_cap_changes_the_loaded_variant_and_status_says_why(monkeypatch):
    monkeypatch.delenv(_build.ISA_VAR, raising=False)
    best = RUNNABLE[-1]
    assert _native.variant() == best
    assert _native.status().startswith(f"available ({best}: the best this CPU runs; ")
    monkeypatch.setenv(_build.ISA_VAR, " AVX2 ")            # case and spaces do not matter
    assert _native.variant() == "avx2"
    if best != "avx2":
        assert _native.status().startswith(
            f"available (avx2: {_build.ISA_VAR}=avx2 caps it; this CPU runs up to {best}; ")
    monkeypatch.setenv(_build.ISA_VAR, "auto")
    assert _native.variant() == best
    x, _, op = make_case("int8", {}, 1, 256, 64, jnp.float32)
    fn = lambda x: qmatmul(x, op, backend="xla")
    assert _targets(fn, x) == {f"qkern_int8_gemv_{best}"}


@needs_native
@pytest.mark.parametrize("value", ["amx", "avx512_vnni", "sse2", "avx-512"])
def test_a_cap_naming_no_variant_is_refused(monkeypatch, caplog, value):
    monkeypatch.setenv(_build.ISA_VAR, value)
    with pytest.raises(ValueError, match=f"{_build.ISA_VAR}='{value}' is not one of avx2, avx512"):
        _build.isa_cap()
    x, _, op = make_case("nf4", {}, 1, 256, 64, jnp.float32)
    with caplog.at_level(logging.INFO, logger="qkern"):
        assert not _native.eligible(x, op)                # refused: the scan runs
    assert _native.status() == f"unavailable: {_build.ISA_VAR}={value!r} is not one of " \
        "avx2, avx512 (or auto, the best this CPU runs); AVX-512 VNNI and AMX have no " \
        "variant of their own: their products take int8 or bfloat16 operands, not float32 " \
        "activations"
    assert [r.levelname for r in caplog.records if "unavailable" in r.message] == ["WARNING"]
    fn = lambda x: qmatmul(x, op, backend="xla")
    assert _targets(fn, x) == set()
    assert_matches(jax.jit(fn)(x), reference_matmul(x, op))


@needs_native
def test_a_function_jitted_earlier_keeps_its_variant(monkeypatch):
    if len(RUNNABLE) < 2:
        pytest.skip("this CPU runs one variant")
    x, _, op = make_case("int4", {}, 1, 256, 64, jnp.float32)
    f = jax.jit(lambda x: qmatmul(x, op, backend="xla"))
    monkeypatch.setenv(_build.ISA_VAR, "avx2")
    y = f(x)
    monkeypatch.setenv(_build.ISA_VAR, RUNNABLE[-1])
    assert "qkern_packed4_gemv_avx2" in f.lower(x).compile().as_text()   # traced once
    np.testing.assert_array_equal(f(x), y)


def test_cpu_flags_decide_the_runnable_variants():
    assert _build.runnable_variants(set()) == []
    assert _build.runnable_variants({"avx2", "fma", "f16c"}) == ["avx2"]
    assert _build.runnable_variants({"avx2", "fma", "f16c", "avx512f", "avx512bw"}) == ["avx2"]
    assert _build.runnable_variants({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                     "avx512_vnni"}) == ["avx2", "avx512"]


def test_variant_is_part_of_the_library_name():
    cxx = _build._compiler() or ["c++"]
    paths = {v: _build.library_path(cxx, v) for v in _build.VARIANTS}
    assert len(set(paths.values())) == len(paths)
    for v, p in paths.items():
        assert p.name.startswith(f"qgemv-{v}-") and p.suffix == ".so"


def _compiler_takes(cxx, flags) -> bool:
    proc = subprocess.run([*cxx, *flags, "-x", "c++", "-fsyntax-only", "-"], input="int x;\n",
                          capture_output=True, text=True)
    return proc.returncode == 0


@pytest.mark.skipif(not X86 or _build._compiler() is None, reason="needs x86-64 and a C++ compiler")
@pytest.mark.parametrize("variant", list(_build.VARIANTS))
def test_every_variant_compiles(variant, monkeypatch, tmp_path):
    """Built whether or not this CPU runs it (not loaded where it does not)."""
    cxx = _build._compiler()
    isa_flags = [f for f in _build.VARIANTS[variant][1] if f.startswith("-m")]
    if not _compiler_takes(cxx, isa_flags):
        pytest.skip(f"{' '.join(cxx)} does not take {' '.join(isa_flags)}")
    monkeypatch.setenv("QKERN_CACHE_DIR", str(tmp_path))
    path = _build.build(variant, cxx)
    assert path.exists() and path.parent == tmp_path / "native"
    assert path.name.startswith(f"qgemv-{variant}-")
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True,
                         text=True)
    if out.returncode == 0:                                   # binutils present
        for symbol in [*_build.TARGETS, "qkern_native_supported", "qkern_native_variant"]:
            assert symbol in out.stdout


def _bench(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_native
def test_crossover_bench_times_every_variant(capsys):
    _bench("native_crossover").main(["--m", "1", "--k", "256", "--n", "72", "--formats", "int4",
                                     "--repeats", "1", "--isa", "all"])
    out = capsys.readouterr().out
    cols = " | ".join(f"int4 {v}" for v in RUNNABLE)
    assert f"| M | dense (ms) | {cols} | int4 scan |" in out and "\n| 1 | " in out
    _bench("native_crossover").main(["--m", "40", "--k", "256", "--n", "72", "--formats",
                                     "int8", "--repeats", "1", "--dequantized"])
    out = capsys.readouterr().out
    assert "| int8 native | int8 scan | int8 dequantised |" in out and "\n| 40 | " in out


@needs_native
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=IDS)
def test_dequantize_matches_reference(isa, fmt, opts):
    """The dequantisation kernels of every variant, bit for bit (37 columns: tails past
    whole vectors of 8 and 16)."""
    from qkern.pallas._operand import reference_dequantize
    from qkern.pallas.qmatmul import _xla as qmatmul_xla
    _, _, op = make_case(fmt, opts, 1, 300, 37, jnp.float32)
    fn = jax.jit(lambda op: qmatmul_xla.dequantized(op))   # traced afresh: this variant
    assert (f"_dequantize_{isa}" in fn.lower(op).compile().as_text()) == (op.zeros is None)
    np.testing.assert_array_equal(np.asarray(fn(op)), np.asarray(reference_dequantize(op)))


def test_peers_bench_times_every_variant(capsys):
    pytest.importorskip("torch")
    _bench("peers").main(["--m", "1", "--k", "256", "--n", "128", "--formats", "int8",
                          "--repeats", "1", "--isa", "all"])
    out = capsys.readouterr().out
    for v in RUNNABLE:
        assert f"| qkern int8 [{v}] |" in out and f"qkern int8 [{v}] vs torch int8: " in out


def test_avx2_fp8_runs_to_m32_for_small_weights_and_m16_above():
    w = jnp.ones((2048, 2049), jnp.float32)
    small, large = (stored_operand(qkern.quantize(w[:, :n], "fp8_e4m3")) for n in (2048, 2049))
    assert _native.max_m(small, "avx2") == 32 and _native.max_m(large, "avx2") == 16
    assert _native.max_m(large, "avx512") == sys.maxsize                # the GEMM above 48
    assert _native.max_m(large, "avx512", jnp.bfloat16) == 48


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3"])
def test_the_kernel_runs_to_m48_except_fp8_with_avx2(isa, fmt):
    x, _, op = make_case(fmt, {}, 45, 256, 48, jnp.float32)   # 16 + 16 + 8 + 4 + 1 rows
    runs = isa == "avx512" or not fmt.startswith("fp8")        # avx2: 8 x 5 + 4 + 1
    # avx512: every M for float32 x (the GEMM from 49 rows); avx2 fp8: 32 for small W
    assert _native.max_m(op) == (sys.maxsize if isa == "avx512" else 48 if runs else 32)
    fn = lambda x: qmatmul(x, op, backend="xla")
    assert bool(_targets(fn, x)) == runs
    assert_matches(jax.jit(fn)(x), reference_matmul(x, op))
