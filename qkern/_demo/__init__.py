"""`qkern demo`: the main job on built-in defaults, for a new user.

With the real model available (`qkern._demo.minilm`: all-MiniLM-L6-v2 and its weights),
that demo runs; otherwise the built-in one (`random_model`): a small transformer with
random weights, quantised in several formats, run under `qkern.quaxify`, with a table of
memory saved, output error and time against dense float32.
"""

from __future__ import annotations

from . import random_model


def real_model():
    """(the minilm demo module or None, the message to show when it is unavailable)."""
    try:
        from . import minilm
    except ImportError as err:
        return None, f"(the real-model demo is not available: {err})"
    try:
        ok, why = minilm.available()
    except Exception as err:  # noqa: BLE001  (a broken optional demo must not stop ours)
        return None, f"(the real-model demo is not available: {type(err).__name__}: {err})"
    return (minilm, "") if ok else (None, why)


def main(*, random: bool = False, progress: bool | None = None, **kwargs) -> int:
    """Run the real-model demo if it can run (and `random` is False), else the built-in.
    progress: a progress bar on stderr (None: when it is a terminal)."""
    if not random:
        mod, why = real_model()
        if mod is not None:
            mod.run(progress=progress)
            return 0
        if why:
            print(why)
            print()
    random_model.run(progress=progress, **kwargs)
    return 0
