"""The `qkern` command: info, bench --json, and one-line errors with exit code 2."""

import json

import pytest

from qkern import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "jax" in out and "qkern backend  xla" in out


def test_bench_json_has_every_row(capsys):
    assert cli.main(["bench", "--json", "--formats", "int8,nf4", "--m", "1,3", "--k", "256",
                     "--n", "128", "--layers", "2", "--width", "64", "--rank", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["qmatmul"]
    assert [(r["format"], r["m"]) for r in rows] == [("int8", 1), ("int8", 3), ("nf4", 1), ("nf4", 3)]
    for r in rows:
        assert r["speedup"] > 0 and r["rel_error"] < 1e-3 and r["weight_bytes"] < r["dense_bytes"]
    assert {r["measurement"] for r in data["trace_compile"]} >= {"trace+compile, unrolled",
                                                                  "trace+compile, scanned"}


@pytest.mark.parametrize("argv", [["bench", "--formats", "int9"], ["bench", "--m", "0"],
                                  ["bench", "--k", "x"], ["frobnicate"]])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qkern") and "Traceback" not in "".join(err)
