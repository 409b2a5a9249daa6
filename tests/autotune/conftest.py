"""Every autotune test gets its own, empty cache directory."""

import pytest

from qkern.autotune import _cache


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "qkern-cache"
    monkeypatch.setenv(_cache.ENV_DIR, str(d))
    monkeypatch.delenv(_cache.ENV_ENABLE, raising=False)
    _cache.invalidate()
    yield d
    _cache.invalidate()
