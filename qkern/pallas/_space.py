"""What every backend's config search space (`candidates`, read by `qkern tune`) is made of.

A backend module declares `SPACE` (field -> values to try), `MAX_CONFIGS` (the cap on
timed configs; None: no cap) and `candidates(problem, op, space, device_kind)`, which
returns (configs to time, [(config, why pruned)], anchor): the anchor is the heuristic's
config, the centre the cap keeps configs nearest to. Every candidate goes through the
kernel's own planner (the code that runs at trace time), so a config the kernel rejects
is pruned with the kernel's message, and configs it turns into the same tiling are timed
once (`search`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable

from ._config import MatmulConfig


def describe(c: MatmulConfig) -> str:
    return ", ".join(f"{f.name}={getattr(c, f.name)}" for f in dataclasses.fields(c))


def grid(space: dict, **fixed) -> list[MatmulConfig]:
    """Every MatmulConfig in the product of `space`'s values (`fixed` fields override)."""
    fields = {**space, **{k: (v,) for k, v in fixed.items()}}
    names = list(fields)
    return [MatmulConfig(**dict(zip(names, values)))
            for values in itertools.product(*(fields[n] for n in names))]


def search(configs: Iterable[MatmulConfig], plan: Callable[[MatmulConfig], Any],
           tiling: Callable[[Any], tuple],
           prune: Callable[[Any], str | None] | None = None) -> tuple[list, list]:
    """(kept, pruned): each config planned; those the planner rejects (ValueError or
    TypeError), those with a tiling already kept, and those `prune(plan)` names a reason
    for are pruned with that reason."""
    seen: dict[tuple, MatmulConfig] = {}
    kept, pruned = [], []
    for cfg in configs:
        try:
            p = plan(cfg)
        except (ValueError, TypeError) as err:
            pruned.append((cfg, f"rejected by the kernel: {err}"))
            continue
        key = tiling(p)
        if key in seen:
            pruned.append((cfg, f"same tiling as ({describe(seen[key])}) after clamping "
                                "to the problem"))
            continue
        why = prune(p) if prune is not None else None
        if why:
            pruned.append((cfg, why))
            continue
        seen[key] = cfg
        kept.append(cfg)
    return kept, pruned
