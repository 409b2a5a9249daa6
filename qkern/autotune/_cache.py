"""The on-disk autotune cache: where it lives, what it holds, how it is read and written.

One JSON file, `autotune.json`, in `$QKERN_CACHE_DIR` (default: the user cache directory,
e.g. `~/.cache/qkern`). Entries are keyed by device kind, jax version, backend, kernel,
M, K, N, activation dtype, format, block size and zero points, so one file serves several
machines sharing a home directory and survives jax upgrades (old entries are simply not
matched). Layout:

    {"schema": "qkern-autotune-cache", "version": 1,
     "entries": {"<key>": {"device_kind": ..., "jax": ..., "backend": ..., "kernel": ...,
                           "m": ..., "k": ..., "n": ..., "x_dtype": ..., "fmt": ...,
                           "block_size": ..., "zeros": ..., "config": {...},
                           "time_ms": ..., "default_ms": ..., "tuned_at": ...}}}

Reading: the file is loaded once per process and re-read only when it changes on disk
(its inode, size or mtime) or when this process writes it. A file that is not valid JSON,
has another schema or version, or holds malformed entries is reported with a
`CacheWarning` naming the file and ignored (entry by entry where possible): never fatal.

Writing: under an exclusive lock on a sibling `.lock` file (POSIX `flock`; none on
platforms without fcntl), the current file is re-read, the new entries merged in, and the
result written to a temporary file in the same directory, fsynced and moved over the old
one with `os.replace`. Readers never see a half-written file, and concurrent writers
(two `qkern tune` runs) lose no entries.

`QKERN_AUTOTUNE=0` turns cache lookups off (kernels use the heuristics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable

import jax

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from .._cache_dir import ENV_DIR, cache_dir  # noqa: F401  (qkern.autotune.cache_dir)
from .._core import _dispatch
from .._version import __version__
from ..pallas import _config
from ..pallas._config import MatmulConfig, Problem

SCHEMA = "qkern-autotune-cache"
VERSION = 2                  # 2: problems carry the kernel family's LoRA rank
FILENAME = "autotune.json"
ENV_ENABLE = "QKERN_AUTOTUNE"

_KEY_FIELDS = ("device_kind", "jax", "backend", "kernel", "m", "k", "n", "x_dtype", "fmt",
               "block_size", "zeros", "rank")
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(MatmulConfig))


class CacheWarning(UserWarning):
    """The autotune cache file could not be used (it is ignored, never fatal)."""


# --------------------------------------------------------------------------------------
# Location and identity
# --------------------------------------------------------------------------------------


def cache_path() -> Path:
    return cache_dir() / FILENAME


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _device_kind_of(platform_name: str) -> str:
    if platform_name == "cpu":
        return f"cpu: {_cpu_model()} x{os.cpu_count()}"
    return str(jax.devices()[0].device_kind)


def device_kind() -> str:
    """The kind of the default device; for CPUs, the processor model and core count
    (every CPU's jax device_kind is just "cpu")."""
    return _device_kind_of(jax.default_backend())


def jax_version() -> str:
    return jax.__version__


def entry_key(fields: dict) -> str:
    return "|".join(f"{name}={fields[name]}" for name in _KEY_FIELDS)


def key_fields(problem: Problem) -> dict:
    """The cache key of `problem` on this device and jax, as a dict of _KEY_FIELDS."""
    d = dataclasses.asdict(problem)
    return {"device_kind": device_kind(), "jax": jax_version(), **d}


def make_entry(problem: Problem, config: MatmulConfig, *, time_s: float,
               default_time_s: float | None = None, **extra) -> dict:
    entry = key_fields(problem)
    entry["config"] = dataclasses.asdict(config)
    entry["time_ms"] = round(time_s * 1e3, 6)
    if default_time_s is not None and math.isfinite(default_time_s):
        entry["default_ms"] = round(default_time_s * 1e3, 6)
    entry["tuned_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    entry["qkern"] = __version__
    entry.update(extra)
    return entry


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _warn(path: Path, why: str) -> None:
    warnings.warn(f"qkern: ignoring autotune cache {path}: {why}", CacheWarning, stacklevel=3)


def _check_entry(key: str, e: Any) -> str | None:
    """Why entry `e` is unusable, or None when it is well formed."""
    if not isinstance(e, dict):
        return "not an object"
    missing = [f for f in _KEY_FIELDS + ("config",) if f not in e]
    if missing:
        return f"missing {', '.join(missing)}"
    for f in ("m", "k", "n", "block_size"):
        if not isinstance(e[f], int) or isinstance(e[f], bool) or e[f] <= 0:
            return f"{f}={e[f]!r} is not a positive int"
    if not isinstance(e["rank"], int) or isinstance(e["rank"], bool) or e["rank"] < 0:
        return f"rank={e['rank']!r} is not a non-negative int"
    for f in ("time_ms", "default_ms"):
        if f in e and (not isinstance(e[f], (int, float)) or isinstance(e[f], bool)):
            return f"{f}={e[f]!r} is not a number"
    cfg = e["config"]
    if not isinstance(cfg, dict) or set(cfg) - set(_CONFIG_FIELDS):
        return f"config {cfg!r} is not a MatmulConfig"
    try:
        MatmulConfig(**cfg)
    except (TypeError, ValueError) as err:
        return str(err)
    if entry_key(e) != key:
        return "its key does not match its fields"
    return None


def read_entries(path: Path | None = None, *, warn: bool = True) -> dict[str, dict]:
    """The valid entries of the cache file (empty when it is missing or unusable).

    Problems are reported as CacheWarnings naming the file when `warn`; nothing raises.
    """
    path = cache_path() if path is None else Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        if warn:
            _warn(path, f"cannot read it ({err.strerror or err})")
        return {}
    except UnicodeDecodeError as err:       # bytes that are not text: as broken JSON
        if warn:
            _warn(path, f"not valid JSON ({err}); it will be rewritten by the next `qkern tune`")
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        if warn:
            _warn(path, f"not valid JSON ({err}); it will be rewritten by the next `qkern tune`")
        return {}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        if warn:
            _warn(path, f"not a qkern autotune cache (schema {SCHEMA!r} expected)")
        return {}
    if data.get("version") != VERSION:
        if warn:
            _warn(path, f"written for cache version {data.get('version')!r}, this qkern reads "
                        f"version {VERSION}; re-run `qkern tune` to replace it")
        return {}
    raw = data.get("entries")
    if not isinstance(raw, dict):
        if warn:
            _warn(path, "'entries' is not an object")
        return {}
    good, bad = {}, []
    for key, e in raw.items():
        why = _check_entry(key, e)
        if why is None:
            good[key] = e
        else:
            bad.append(f"{key!r}: {why}")
    if bad and warn:
        _warn(path, f"{len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'} skipped "
                    f"(first: {bad[0]})")
    return good


# In-memory index of the file: (device, jax, backend, kernel, k, n, dtype, fmt, block, zeros)
# -> {m: MatmulConfig}, rebuilt when the file's identity changes.
_lock = threading.Lock()
_state: dict[str, Any] = {"path": None, "stamp": None, "index": {}}


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _index_key(fields: dict) -> tuple:
    return tuple(fields[f] for f in _KEY_FIELDS if f != "m")


def _build_index(entries: dict[str, dict]) -> dict:
    index: dict[tuple, dict[int, MatmulConfig]] = {}
    for e in entries.values():
        index.setdefault(_index_key(e), {})[e["m"]] = MatmulConfig(**e["config"])
    return index


def _current_index() -> dict:
    path = cache_path()
    stamp = _stamp(path)
    with _lock:
        if _state["path"] == path and _state["stamp"] == stamp:
            return _state["index"]
    index = _build_index(read_entries(path)) if stamp is not None else {}
    with _lock:
        changed = _state["path"] == path  # the file changed under us (not a first load)
        _state.update(path=path, stamp=stamp, index=index)
    if changed:
        _retrace()
    return index


def _retrace() -> None:
    """Make quaxify re-trace the jits it has cached, so kernels look their configs up again.

    qkern's dispatch core caches each jit it meets (`jnp.matmul` is one) per input
    structure and per its rule generation; bumping the generation is what registering a
    rule does. Without it a function traced before `qkern tune` wrote the cache would keep
    the old config in later traces of this process.
    """
    _dispatch._generation[0] += 1


def invalidate() -> None:
    """Forget the loaded cache: the next lookup reads the file again."""
    with _lock:
        _state.update(path=None, stamp=None, index={})
    _retrace()


_local = threading.local()


@contextlib.contextmanager
def bypassed():
    """Lookups in this thread return None inside the block (the tuner times defaults)."""
    depth = getattr(_local, "bypass", 0)
    _local.bypass = depth + 1
    try:
        yield
    finally:
        _local.bypass = depth


def enabled() -> bool:
    if getattr(_local, "bypass", 0):
        return False
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def lookup(problem: Problem) -> MatmulConfig | None:
    """The tuned config for `problem` on this device and jax version, or None.

    An exact M wins; otherwise the entry with the nearest M (by ratio) in the same regime
    (decode M <= 16, prefill above), since one tiling serves neighbouring batch sizes.
    """
    if not enabled():
        return None
    by_m = _current_index().get(_index_key(key_fields(problem)))
    if not by_m:
        return None
    if problem.m in by_m:
        return by_m[problem.m]
    same = [m for m in by_m if (m <= 16) == (problem.m <= 16)]
    if not same:
        return None
    best = min(same, key=lambda m: (abs(math.log(m / problem.m)), m))
    return by_m[best]


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path):
    if fcntl is None:  # no flock (Windows): atomic replace still, merges may race
        yield
        return
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_entries(entries: Iterable[dict], path: Path | None = None) -> Path:
    """Merge `entries` (from `make_entry`) into the cache file, atomically. Returns its path.

    Existing valid entries are kept unless replaced by a new one with the same key; an
    unusable file (reported) is replaced.
    """
    path = cache_path() if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = {entry_key(e): e for e in entries}
    with _file_lock(path):
        merged = read_entries(path, warn=True)
        merged.update(new)
        data = {"schema": SCHEMA, "version": VERSION,
                "entries": dict(sorted(merged.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    invalidate()
    return path


def clear(path: Path | None = None) -> bool:
    """Delete the cache file. Returns whether there was one."""
    path = cache_path() if path is None else Path(path)
    with _file_lock(path) if path.parent.exists() else contextlib.nullcontext():
        try:
            path.unlink()
        except FileNotFoundError:
            return False
    invalidate()
    return True


def _lookup(problem: Problem) -> MatmulConfig | None:
    """`lookup`, found by name at each call (so that a test may replace it)."""
    return lookup(problem)


_config.LOOKUPS.append(_lookup)   # kernels ask config_for, which asks this cache
