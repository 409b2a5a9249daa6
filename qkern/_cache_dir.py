"""Where qkern keeps what it computes once per machine: the autotuned kernel configs and
the native CPU kernels it builds. A leaf module: both the autotune cache and the native
build read it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_DIR = "QKERN_CACHE_DIR"


def cache_dir() -> Path:
    """`$QKERN_CACHE_DIR`, else the platform's user cache directory + /qkern."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "qkern" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "qkern"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qkern"
