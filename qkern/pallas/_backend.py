"""Which kernel backend runs, and the one table of every family's implementations.

Selection: an argument, `qkern.backend(...)`, `QKERN_BACKEND`, or the device, in that
order. Backends: "triton" (NVIDIA GPUs), "mosaic_tpu" (TPUs), "xla" (no Pallas: the CPU
path and the fallback everywhere). `interpret=True` runs a Pallas backend in interpret
mode, on any device (tests).

The table: each kernel family (`qmatmul`, `w8a8`, `lora_qmatmul`) registers one module per
backend (`register`), and `implementation(family, selection, op)` gives the module that
runs. A module provides the family's kernel functions under the family's names (`forward`,
and `transposed` where the family has one) and `candidates`, its config search space for
`qkern tune`; it may provide `unsupported(op) -> reason | None`. When the selected backend
has no module for a family, or its module says it cannot run an operand, the xla module
runs instead, with a warning, unless the backend was asked for by argument, which raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from types import ModuleType

import jax

from .._core._dispatch import register_trace_context

BACKENDS = ("triton", "mosaic_tpu", "xla")
ENV_VAR = "QKERN_BACKEND"


@dataclasses.dataclass(frozen=True)
class Selection:
    name: str
    interpret: bool = False
    explicit: bool = False      # named by the caller's `backend=` argument: never fall back


_state = threading.local()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Unknown qkern backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return name


@contextlib.contextmanager
def backend(name: str, *, interpret: bool = False):
    """Run qkern's kernels on `name` inside this block.

        with qkern.backend("xla"):
            y = qkern.quaxify(model)(qparams, x)

    The choice is read when a function is traced: a function jitted earlier keeps the
    backend it was traced with.
    """
    sel = Selection(_check(name), bool(interpret))
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(sel)
    try:
        yield sel
    finally:
        stack.pop()


def device_default() -> str:
    platform = jax.default_backend()
    if platform in ("gpu", "cuda"):
        return "triton"
    if platform == "tpu":
        return "mosaic_tpu"
    return "xla"


def resolve(name: str | None = None, interpret: bool | None = None) -> Selection:
    """The backend to use: explicit argument > innermost `backend(...)` > env > device."""
    stack = getattr(_state, "stack", None) or []
    if name is not None:
        sel = Selection(_check(name), bool(interpret), explicit=True)
    elif stack:
        sel = stack[-1]
        if interpret is not None:
            sel = Selection(sel.name, bool(interpret))
    elif (env := env_backend()) is not None:
        sel = Selection(env, bool(interpret))
        why = None if interpret else unavailable_here(env)
        if why is not None and (ENV_VAR, env, why) not in _warned:
            _warned.add((ENV_VAR, env, why))
            warnings.warn(f"qkern: {ENV_VAR}={env}, but {why}: quantised matmuls will fail "
                          f"to compile here. Unset {ENV_VAR} or set it to xla.", stacklevel=2)
    else:
        sel = Selection(device_default(), bool(interpret))
    return sel


def env_backend() -> str | None:
    """The backend `QKERN_BACKEND` names (None when unset or blank); a name that is not
    a backend raises ValueError naming the variable and the backends."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    if raw.lower() not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a qkern backend; set it to one of "
                         f"{', '.join(BACKENDS)}, or unset it.")
    return raw.lower()


# The jax platforms each Pallas backend compiles for (Pallas runs elsewhere only in
# interpret mode), and what it needs, in words.
_PLATFORMS = {"triton": (("gpu", "cuda"), "an NVIDIA GPU"), "mosaic_tpu": (("tpu",), "a TPU")}


def unavailable_here(name: str) -> str | None:
    """Why backend `name` cannot compile on this machine's jax platform, or None."""
    if name not in _PLATFORMS:
        return None
    platforms, needs = _PLATFORMS[name]
    platform = jax.default_backend()
    if platform in platforms:
        return None
    return (f"the {name} kernels need {needs} and this machine's jax platform is "
            f"{platform} (Pallas runs there only in interpret mode)")


# --------------------------------------------------------------------------------------
# The backend table
# --------------------------------------------------------------------------------------

_TABLE: dict[str, dict[str, ModuleType]] = {}
_warned: set = set()


def register(family: str, **modules: ModuleType) -> None:
    """Each keyword's module implements kernel family `family` on the backend it names:
    `register("qmatmul", xla=_xla, triton=_triton, mosaic_tpu=_mosaic)`."""
    table = _TABLE.setdefault(family, {})
    for name, module in modules.items():
        table[_check(name)] = module


def implementations(family: str) -> dict[str, ModuleType]:
    """{backend: module} registered for `family` (empty for an unknown family)."""
    return dict(_TABLE.get(family, {}))


def implementation(family: str, sel: Selection, op=None) -> tuple[ModuleType, Selection]:
    """(module, selection) that runs `family` for `sel` on operand `op`: the selected
    backend's module, or xla's where that backend lacks the family or rejects `op`."""
    if family not in _TABLE:
        raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(_TABLE)}.")
    impls = _TABLE[family]
    module = impls.get(sel.name)
    if module is None:
        why = f"the {sel.name} backend has no {family} kernel"
    else:
        check = getattr(module, "unsupported", None)
        why = None if (check is None or op is None) else check(op)
        if why is None:
            return module, sel
    if sel.explicit:
        raise ValueError(f"{family}: {why}. Use backend='xla' (runs everywhere) or leave "
                         "backend unset to fall back to it.")
    if (family, sel.name, why) not in _warned:
        _warned.add((family, sel.name, why))
        warnings.warn(f"qkern: {family} runs on the xla backend here: {why}.", stacklevel=3)
    return impls["xla"], Selection("xla", sel.interpret)


# Code traced under one backend must not be reused under another (quaxify's jit cache).
register_trace_context(resolve)
