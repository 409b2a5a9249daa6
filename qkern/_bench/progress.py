"""Progress bars for the long loops of `qkern demo`, `qkern bench` and `qkern tune` (tqdm).

    with bar(total, "qkern bench qmatmul", enabled=progress) as b:
        for item in work:
            b.set_postfix_str(f"{item}")      # what is running now
            ...
            b.update()

Bars go to stderr and always have a known total, fixed when the bar opens (so the bar
never jumps backwards). `enabled`: None draws only when stderr is a terminal (logs and
pipes stay clean), True always, False never.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int, desc: str, *, enabled: bool | None = None, unit: str = "step") -> tqdm:
    """A tqdm bar of `total` steps on stderr (see the module docstring for `enabled`)."""
    sys.stdout.flush()          # what was printed before the bar shows before it
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True,
                disable=None if enabled is None else not enabled, dynamic_ncols=True)
