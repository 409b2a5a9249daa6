"""The autotune cache: key, lookup, invalidation, bad files, atomic concurrent writes."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

from qkern.autotune import _cache
from qkern.autotune._cache import CacheWarning
from qkern.pallas._config import MatmulConfig, Problem, config_for

P = Problem("xla", "qmatmul", 1, 256, 128, "float32", "int8", 256, False)


def _write(problem, block_k):
    return _cache.write_entries([_cache.make_entry(problem, MatmulConfig(block_k=block_k),
                                                   time_s=1e-3)])


def test_miss_is_none_and_config_for_falls_back_to_the_heuristic():
    assert _cache.lookup(P) is None
    assert config_for(P) == MatmulConfig(block_k=256)          # ("xla", "decode")
    assert config_for(Problem("triton", "qmatmul", 1, 256, 128, "bfloat16", "int8", 256)) is None


def test_write_then_lookup_and_the_file_layout(cache_dir):
    path = _write(P, 64)
    assert path == cache_dir / _cache.FILENAME
    assert _cache.lookup(P) == MatmulConfig(block_k=64)
    assert config_for(P) == MatmulConfig(block_k=64)
    assert config_for(P, interpret=True) == MatmulConfig(block_k=256)  # interpret: no cache
    data = json.loads(path.read_text())
    assert data["schema"] == _cache.SCHEMA and data["version"] == _cache.VERSION
    (entry,) = data["entries"].values()
    assert entry["device_kind"] == _cache.device_kind() and entry["jax"] == _cache.jax_version()
    assert (entry["kernel"], entry["m"], entry["k"], entry["n"], entry["x_dtype"],
            entry["fmt"]) == ("qmatmul", 1, 256, 128, "float32", "int8")
    assert [p.name for p in cache_dir.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize("change", [dict(k=512), dict(n=64), dict(x_dtype="bfloat16"),
                                    dict(fmt="int4"), dict(block_size=128), dict(zeros=True),
                                    dict(kernel="qmatmul_t"), dict(backend="triton")])
def test_every_key_field_matters(change):
    _write(P, 64)
    other = Problem(**{**P.__dict__, **change})
    assert _cache.lookup(other) is None


def test_other_devices_and_jax_versions_are_kept_but_not_used(cache_dir):
    for field, value in (("jax", "0.0.1"), ("device_kind", "NVIDIA H100 80GB HBM3")):
        e = _cache.make_entry(P, MatmulConfig(block_k=128), time_s=1e-3)
        e[field] = value
        _cache.write_entries([e])
    assert _cache.lookup(P) is None
    assert len(_cache.read_entries()) == 2
    _write(P, 64)
    assert _cache.lookup(P) == MatmulConfig(block_k=64)
    assert len(_cache.read_entries()) == 3


def test_nearest_m_in_the_same_regime():
    _write(Problem(**{**P.__dict__, "m": 1}), 64)
    _write(Problem(**{**P.__dict__, "m": 16}), 128)
    _write(Problem(**{**P.__dict__, "m": 256}), 512)
    at = lambda m: _cache.lookup(Problem(**{**P.__dict__, "m": m}))  # noqa: E731
    assert at(2).block_k == 64 and at(12).block_k == 128 and at(16).block_k == 128
    assert at(17).block_k == 512 and at(4096).block_k == 512


def test_no_cross_regime_fallback():
    _write(P, 64)                                                   # decode only
    assert _cache.lookup(Problem(**{**P.__dict__, "m": 64})) is None


def test_external_change_is_seen_without_restarting(cache_dir):
    path = _write(P, 64)
    assert _cache.lookup(P).block_k == 64
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    entry["config"]["block_k"] = 128
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)                                           # another process's write
    assert _cache.lookup(P).block_k == 128


def test_disabled_by_environment(monkeypatch):
    _write(P, 64)
    monkeypatch.setenv(_cache.ENV_ENABLE, "0")
    assert _cache.lookup(P) is None and config_for(P).block_k == 256
    with _cache.bypassed():
        monkeypatch.setenv(_cache.ENV_ENABLE, "1")
        assert _cache.lookup(P) is None
    assert _cache.lookup(P).block_k == 64


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"),
    ('{"schema": "qkern-autotune-cache", "version": 99, "entries": {}}', "version 99"),
    ('{"schema": "something-else", "version": 1, "entries": {}}', "not a qkern autotune cache"),
    ('[1, 2, 3]', "not a qkern autotune cache"),
    ('{"schema": "qkern-autotune-cache", "version": 2, "entries": []}', "'entries'"),
    ('{"schema": "qkern-autotune-cache", "version": 1, "entries": {}}', "version 1"),
])
def test_bad_file_is_reported_ignored_and_replaced_by_the_next_write(cache_dir, content, why):
    cache_dir.mkdir(parents=True)
    path = cache_dir / _cache.FILENAME
    path.write_text(content)
    with pytest.warns(CacheWarning, match=why) as rec:
        assert _cache.lookup(P) is None                             # never fatal
    assert str(path) in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_for(P).block_k == 256                         # warned once per file state
    with pytest.warns(CacheWarning):
        _write(P, 64)
    assert _cache.lookup(P).block_k == 64
    assert json.loads(path.read_text())["version"] == _cache.VERSION


def test_malformed_entries_are_skipped_the_rest_used(cache_dir):
    _write(P, 64)
    path = cache_dir / _cache.FILENAME
    data = json.loads(path.read_text())
    good = next(iter(data["entries"].values()))
    data["entries"]["bogus"] = {"m": "one"}
    data["entries"]["wrong-key"] = dict(good, n=999)              # fields disagree with key
    bad_cfg = dict(good, m=2, config={"block_k": -4})
    data["entries"][_cache.entry_key(bad_cfg)] = bad_cfg
    path.write_text(json.dumps(data))
    _cache.invalidate()
    with pytest.warns(CacheWarning, match="3 malformed entries skipped"):
        assert _cache.lookup(P).block_k == 64
    assert _cache.lookup(Problem(**{**P.__dict__, "m": 2})).block_k == 64   # nearest: m=1


def test_concurrent_writers_in_threads_lose_nothing():
    def writer(t):
        for i in range(10):
            _write(Problem(**{**P.__dict__, "m": 1 + t * 10 + i}), 64)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_cache.read_entries()) == 60


def test_concurrent_writer_processes_leave_a_valid_complete_file(cache_dir):
    code = textwrap.dedent("""
        import sys
        from qkern.autotune import _cache
        from qkern.pallas._config import MatmulConfig, Problem
        base = int(sys.argv[1])
        for i in range(25):
            p = Problem("xla", "qmatmul", base + i, 256, 128, "float32", "int8", 256)
            _cache.write_entries([_cache.make_entry(p, MatmulConfig(block_k=64), time_s=1.0)])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(b)], env=env)
             for b in (1, 1001)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    data = json.loads((cache_dir / _cache.FILENAME).read_text())
    assert len(data["entries"]) == 50
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]


def test_clear(cache_dir):
    assert _cache.clear() is False
    _write(P, 64)
    assert _cache.clear() is True and _cache.lookup(P) is None


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(_cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert _cache.cache_dir() == tmp_path / "qkern"
    monkeypatch.setenv(_cache.ENV_DIR, "~/somewhere")
    assert _cache.cache_dir() == _cache.Path("~/somewhere").expanduser()


def test_bytes_that_are_not_text_are_a_bad_file_too(cache_dir):
    """Not UTF-8 at all: reported and ignored like broken JSON (it raised
    UnicodeDecodeError out of every quantised matmul), then replaced by the next write."""
    cache_dir.mkdir(parents=True)
    path = cache_dir / _cache.FILENAME
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.warns(CacheWarning, match="not valid JSON"):
        assert _cache.lookup(P) is None
    with pytest.warns(CacheWarning):
        _write(P, 64)
    assert _cache.lookup(P).block_k == 64


def test_an_entry_with_a_time_that_is_not_a_number_is_skipped(cache_dir):
    _write(P, 64)
    path = cache_dir / _cache.FILENAME
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    entry["time_ms"] = "fast"
    path.write_text(json.dumps(data))
    with pytest.warns(CacheWarning, match="time_ms='fast' is not a number"):
        assert _cache.lookup(P) is None
