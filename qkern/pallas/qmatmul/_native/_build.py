"""Building and loading qkern's native CPU kernels (qgemv.cc), once per machine.

The C++ source ships with the package and is compiled on first use with the system C++
compiler (`$CXX`, else `c++`), against the XLA FFI headers that jaxlib ships
(`jax.ffi.include_dir()`). The library is cached in `$QKERN_CACHE_DIR/native/` under a
name that hashes the source, the flags, the compiler and jaxlib's version, so an upgrade
rebuilds it. Anything that stops it (not x86-64, no compiler, a failed build, a CPU without
AVX2 and FMA, `QKERN_NATIVE=0`) leaves the kernels unavailable and the `xla` backend on its
pure-XLA scan; `status()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

from ...._cache_dir import cache_dir

ENV_VAR = "QKERN_NATIVE"
SOURCE = Path(__file__).with_name("qgemv.cc")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-shared", "-fPIC", "-w")
# FFI handler symbols in qgemv.cc -> the target names qkern registers them under.
TARGETS = {"QkernPacked4Gemv": "qkern_packed4_gemv", "QkernInt8Gemv": "qkern_int8_gemv",
           "QkernFp8Gemv": "qkern_fp8_gemv"}

_log = logging.getLogger("qkern")
_lock = threading.Lock()
_state: dict = {}
_registered: set = set()   # FFI target names registered in this process


def _disabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off")


def _compiler() -> list[str] | None:
    """The compiler command: `$CXX` (which may carry arguments, e.g. "ccache g++"), else
    `c++` or `g++` on the PATH."""
    cxx = shlex.split(os.environ.get("CXX", ""))
    if cxx:
        found = shutil.which(cxx[0])
        return None if found is None else [found, *cxx[1:]]
    found = shutil.which("c++") or shutil.which("g++")
    return None if found is None else [found]


def library_path(cxx: list[str]) -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join([*cxx, *FLAGS]).encode())
    key.update(jaxlib.__version__.encode())
    return cache_dir() / "native" / f"qgemv-{key.hexdigest()[:16]}.so"


def _compile(cxx: list[str], out: Path) -> None:
    """Compile to a temporary file beside `out`, then move it into place (concurrent
    processes may build at once; each move is atomic). The library gets the usual
    permissions for the umask, so others sharing the cache directory can load it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [*cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp, "-lpthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    """(library, None) or (None, the reason the kernels are unavailable)."""
    if _disabled():
        return None, f"{ENV_VAR}={os.environ[ENV_VAR]}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the native kernels are x86-64 only (this machine: {platform.machine()})"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set $CXX or install g++/clang++)"
    try:
        path = library_path(cxx)
        if not path.exists():
            _log.info("qkern: building the native CPU kernels into %s (once per machine)", path)
            _compile(cxx, path)
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError:          # a cached library this process cannot load: build it again
            _compile(cxx, path)
            lib = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} failed: {e}"
    if not lib.qkern_native_supported():
        return None, "this CPU lacks AVX2, FMA or F16C"
    for symbol, name in TARGETS.items():
        # Once per process: XLA refuses a second handler under the same name (and a refused
        # registration breaks the CPU backend), so a rebuilt library keeps the first one's.
        if name not in _registered:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
            _registered.add(name)
    return lib, None


def library():
    """The loaded library, building it on first call; None when unavailable (logged once,
    as a warning when installing something would fix it)."""
    if _disabled():
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
            why = _state["why"]
            if why is not None:
                fixable = why.startswith(("no C++ compiler", "building"))
                _log.log(logging.WARNING if fixable else logging.INFO,
                         "qkern: native CPU kernels unavailable (%s); small-M quantised "
                         "matmuls run the slower XLA scan. `qkern info` shows this.", why)
    return _state["lib"]


def status() -> str:
    """'available (path)' or why the native kernels are not used."""
    if library() is not None:
        return f"available ({_state['lib']._name})"
    return f"unavailable: {_state.get('why') or f'{ENV_VAR}={os.environ.get(ENV_VAR)}'}"
