"""Autotuning of the quantised-matmul kernels, and the on-disk cache the kernels read.

    results = qkern.autotune(m=(1, 16), k=4096, n=4096, formats=("int8", "nf4"))
    qkern tune --m 1,16 --k 4096 --n 4096 --formats int8,nf4       # the same, from a shell

`autotune` times each kernel's candidate configs on this machine (`_space` builds and
prunes the search space, `_tune` times it) and merges the winners into the cache file
(`_cache`: location, key, atomic writes). Kernels call `qkern.pallas._config.config_for`
at trace time, which returns the cached winner for this device or the shipped heuristic.
See docs/autotuning.md.
"""

import inspect
import sys
import types

from ._cache import (
    CacheWarning,
    cache_dir,
    cache_path,
    clear,
    device_kind,
    invalidate,
    lookup,
    read_entries,
)
from ._tune import SpecError, TuneResult, autotune, find_problems, load_function

__all__ = ["autotune", "TuneResult", "find_problems", "load_function", "SpecError",
           "CacheWarning", "cache_dir", "cache_path", "read_entries", "lookup", "clear",
           "invalidate", "device_kind"]


class _CallableModule(types.ModuleType):
    """`qkern.autotune` is both this package and the tuning function: calling the package
    calls `autotune`, so `qkern.autotune(m=1, ...)`, `import qkern.autotune as m` and
    `import qkern.autotune._cache` all work."""

    def __call__(self, *args, **kwargs):
        return autotune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(autotune)     # what inspect and help() show for the call
