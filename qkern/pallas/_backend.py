"""Which kernel backend runs: an argument, `qkern.backend(...)`, `QKERN_BACKEND`, or the device.

Backends: "triton" (NVIDIA GPUs), "mosaic_tpu" (TPUs), "xla" (no Pallas: the CPU path and
the fallback everywhere). `interpret=True` runs a Pallas backend in interpret mode, on any
device (tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import jax

from .._core._dispatch import register_trace_context

BACKENDS = ("triton", "mosaic_tpu", "xla")
ENV_VAR = "QKERN_BACKEND"


@dataclasses.dataclass(frozen=True)
class Selection:
    name: str
    interpret: bool = False


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
        sel = Selection(_check(name), bool(interpret))
    elif stack:
        sel = stack[-1]
        if interpret is not None:
            sel = Selection(sel.name, bool(interpret))
    elif os.environ.get(ENV_VAR):
        sel = Selection(_check(os.environ[ENV_VAR].strip().lower()), bool(interpret))
    else:
        sel = Selection(device_default(), bool(interpret))
    return sel


# Code traced under one backend must not be reused under another (quaxify's jit cache).
register_trace_context(resolve)
