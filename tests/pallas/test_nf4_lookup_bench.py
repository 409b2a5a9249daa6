"""bench/nf4_lookup.py: every way of writing the nf4 lookup it times gives the shipped
kernel's answer (the script refuses to time a variant that disagrees)."""

import importlib.util
import pathlib

import numpy as np

import jax.numpy as jnp

_PATH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "nf4_lookup.py"


def _load():
    spec = importlib.util.spec_from_file_location("nf4_lookup", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_agree_with_a_dense_reference():
    mod = _load()
    rng = np.random.default_rng(1)
    m, k, n = 3, 256, 128
    packed = rng.integers(0, 256, (k // 2, n), dtype=np.uint8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    table = np.asarray(mod._T)
    w = np.concatenate([table[packed & 15], table[packed >> 4]], axis=0)   # [K, N]
    for name, decode in mod.VARIANTS.items():
        if "no lookup" in name:
            continue
        got = mod.scan_matmul(decode, m, k, n, rows=32)(jnp.asarray(x), jnp.asarray(packed))
        np.testing.assert_allclose(np.asarray(got), x @ w, rtol=1e-5, atol=1e-4, err_msg=name)


def test_script_runs_and_prints_the_table(capsys):
    _load().main(["--k", "256", "--n", "128", "--rows", "32", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "(shipped) |" in out and out.count("\n| ") == 11   # header + 10 variants
