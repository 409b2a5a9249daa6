"""Building and loading qkern's native CPU kernels (qgemv.cc), once per machine.

The C++ source ships with the package and is compiled on first use with the system C++
compiler (`$CXX`, else `c++`), against the XLA FFI headers that jaxlib ships
(`jax.ffi.include_dir()`), into one library per instruction-set variant (VARIANTS, lowest
first): `avx2` (AVX2 + FMA + F16C, the floor) and `avx512` (AVX-512 F/BW/VL: the same loops
on 512-bit vectors). The best variant this CPU runs is built and loaded (only that one);
`$QKERN_NATIVE_ISA` caps it (`avx2` or `avx512`; unset or `auto`: no cap). Each library is
cached in `$QKERN_CACHE_DIR/native/` as `qgemv-<variant>-<hash>.so`, the hash covering the
source, the variant's flags, the compiler and jaxlib's version, so an upgrade rebuilds it.
Its FFI targets carry the variant's name (`qkern_int8_gemv_avx512`), so variants loaded in
one process (a changed cap) never clash. Anything that stops it (not x86-64, no compiler,
a failed build, a CPU without AVX2, FMA and F16C, a `$QKERN_NATIVE_ISA` that names no
variant, `QKERN_NATIVE=0`) leaves the kernels unavailable and the `xla` backend on its
pure-XLA scan; `status()` says why, and which variant runs and why where one does.

No variant uses AVX-512 VNNI or AMX: both multiply int8 (or bfloat16) operands, and these
kernels multiply float32 activations by exactly decoded weights; rounding x to int8 or
bfloat16 would change the results.
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
ISA_VAR = "QKERN_NATIVE_ISA"
SOURCE = Path(__file__).with_name("qgemv.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")   # every variant
# variant -> (the /proc/cpuinfo flags it needs, its compiler flags), lowest first
VARIANTS = {
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    "avx512": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"),
               ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-DQKERN_AVX512")),
}
# FFI handler symbols in qgemv.cc -> the target names qkern registers them under, each
# followed by `_<variant>` (`target()`).
TARGETS = {"QkernPacked4Gemv": "qkern_packed4_gemv", "QkernInt8Gemv": "qkern_int8_gemv",
           "QkernFp8Gemv": "qkern_fp8_gemv",
           "QkernPacked4Dequantize": "qkern_packed4_dequantize",
           "QkernInt8Dequantize": "qkern_int8_dequantize",
           "QkernFp8Dequantize": "qkern_fp8_dequantize"}

_log = logging.getLogger("qkern")
_lock = threading.Lock()
_state: dict = {}          # $QKERN_NATIVE_ISA as set -> what _load() found for it
_lock_variants = threading.RLock()
_loaded: dict = {}         # library path -> the loaded library (None: cpuid says no)
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


def flags(variant: str) -> tuple[str, ...]:
    """The compiler flags of `variant`."""
    return FLAGS + VARIANTS[variant][1]


def library_path(cxx: list[str], variant: str = "avx2") -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join([*cxx, *flags(variant)]).encode())
    key.update(jaxlib.__version__.encode())
    return cache_dir() / "native" / f"qgemv-{variant}-{key.hexdigest()[:16]}.so"


def isa_cap() -> str | None:
    """The variant `$QKERN_NATIVE_ISA` caps the choice at (None: no cap). A value that
    names no variant raises a ValueError naming the valid ones."""
    raw = os.environ.get(ISA_VAR, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in VARIANTS:
        raise ValueError(
            f"{ISA_VAR}={os.environ[ISA_VAR]!r} is not one of {', '.join(VARIANTS)} (or auto, "
            "the best this CPU runs); AVX-512 VNNI and AMX have no variant of their own: "
            "their products take int8 or bfloat16 operands, not float32 activations")
    return raw


def cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and ":" in line:
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def runnable_variants(cpu: set[str] | None = None) -> list[str]:
    """The variants this CPU runs, lowest first. Where its flags are unknown, the floor
    only (whose own cpuid check still decides)."""
    cpu = cpu_flags() if cpu is None else cpu
    if cpu is None:
        return ["avx2"]
    return [v for v, (need, _) in VARIANTS.items() if set(need) <= cpu]


def _compile(cxx: list[str], out: Path, variant: str = "avx2") -> None:
    """Compile to a temporary file beside `out`, then move it into place (concurrent
    processes may build at once; each move is atomic). The library gets the usual
    permissions for the umask, so others sharing the cache directory can load it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [*cxx, *flags(variant), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp,
           "-lpthread"]
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


def build(variant: str, cxx: list[str] | None = None) -> Path:
    """The library of `variant`, compiled into the cache unless it is there already; it
    compiles on any x86-64 machine, whether or not its CPU runs it (the tests build every
    variant). Raises RuntimeError (or OSError) where it cannot be built."""
    cxx = cxx or _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++/clang++)")
    path = library_path(cxx, variant)
    if not path.exists():
        _log.info("qkern: building the %s native CPU kernels into %s (once per machine)",
                  variant, path)
        _compile(cxx, path, variant)
    return path


def target(name: str, variant: str) -> str:
    """The FFI target name of kernel `name` (a value of TARGETS) in `variant`."""
    return f"{name}_{variant}"


def _open(cxx: list[str], variant: str):
    """The loaded library of `variant`, its FFI targets registered; None where this CPU
    does not run it (its own cpuid check)."""
    with _lock_variants:
        path = library_path(cxx, variant)
        if path in _loaded:
            return _loaded[path]
        build(variant, cxx)
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError:          # a cached library this process cannot load: build it again
            _compile(cxx, path, variant)
            lib = ctypes.cdll.LoadLibrary(str(path))
        lib.qkern_native_variant.restype = ctypes.c_char_p
        if lib.qkern_native_variant().decode() != variant:
            raise RuntimeError(f"{path} is not the {variant} variant")
        if not lib.qkern_native_supported():
            _loaded[path] = None
            return None
        for symbol, name in TARGETS.items():
            # Once per process: XLA refuses a second handler under the same name (and a
            # refused registration breaks the CPU backend), so a library rebuilt later (a
            # new cache directory) keeps the first one's.
            full = target(name, variant)
            if full not in _registered:
                jax.ffi.register_ffi_target(full, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
                _registered.add(full)
        _loaded[path] = lib
        return lib


def _load() -> dict:
    """{"lib", "variant", "why"}: the loaded library and its variant, with why that one
    (lib None: why the kernels are unavailable)."""
    none = dict(lib=None, variant=None)
    if _disabled():
        return dict(none, why=f"{ENV_VAR}={os.environ[ENV_VAR]}")
    try:
        cap = isa_cap()
    except ValueError as e:
        return dict(none, why=str(e))
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return dict(none, why="the native kernels are x86-64 only "
                              f"(this machine: {platform.machine()})")
    cxx = _compiler()
    if cxx is None:
        return dict(none, why="no C++ compiler found (set $CXX or install g++/clang++)")
    runnable = runnable_variants()
    names = list(VARIANTS)
    allowed = [v for v in runnable if cap is None or names.index(v) <= names.index(cap)]
    if not runnable or not allowed:
        return dict(none, why="this CPU lacks AVX2, FMA or F16C")
    best = runnable[-1]
    for variant in reversed(allowed):       # the best first; lower ones where cpuid says no
        try:
            lib = _open(cxx, variant)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            return dict(none, why=f"building {SOURCE.name} ({variant}) failed: {e}")
        if lib is None:
            continue
        if variant == best:
            why = "the best this CPU runs"
        elif cap is not None and variant == cap:
            why = f"{ISA_VAR}={cap} caps it; this CPU runs up to {best}"
        else:
            why = f"this CPU's cpuid refuses {allowed[-1]}"
        return dict(lib=lib, variant=variant, why=why)
    return dict(none, why="this CPU lacks AVX2, FMA or F16C")


def _key() -> str:
    return os.environ.get(ISA_VAR, "").strip().lower()


def _entry() -> dict | None:
    """The loaded state for the current `$QKERN_NATIVE_ISA`, loading it on first call
    (failures logged once per setting, as a warning when the user can fix them)."""
    if _disabled():
        return None
    key = _key()
    with _lock:
        if key not in _state:
            _state[key] = entry = _load()
            why = entry["why"]
            if entry["lib"] is None:
                fixable = why.startswith(("no C++ compiler", "building", ISA_VAR))
                _log.log(logging.WARNING if fixable else logging.INFO,
                         "qkern: native CPU kernels unavailable (%s); small-M quantised "
                         "matmuls run the slower XLA scan. `qkern info` shows this.", why)
        return _state[key]


def library():
    """The loaded library of the chosen variant, building it on first call; None when
    unavailable (logged once, as a warning when installing or setting something would fix
    it). The choice follows `$QKERN_NATIVE_ISA` as it is at each call."""
    entry = _entry()
    return None if entry is None else entry["lib"]


def variant() -> str | None:
    """The variant `library()` loaded ("avx2", "avx512"), or None."""
    entry = _entry()
    return None if entry is None else entry["variant"]


def status() -> str:
    """'available (variant: why; path)' or why the native kernels are not used."""
    entry = _entry()
    if entry is None:
        return f"unavailable: {ENV_VAR}={os.environ.get(ENV_VAR)}"
    if entry["lib"] is not None:
        return f"available ({entry['variant']}: {entry['why']}; {entry['lib']._name})"
    return f"unavailable: {entry['why']}"
