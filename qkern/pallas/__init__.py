"""Quantised matmul kernels and their selection.

`qmatmul_dispatch(lhs, rhs, params)` is what QArray's dot_general rule calls. Today it is
the XLA path (dequantise, then dot) for every layout; the Pallas kernels (Triton, Mosaic)
and the K-blocked CPU path take over the canonical layout as they land.
"""

from __future__ import annotations

import jax

from .._core._dispatch import materialise_checked


def qmatmul_dispatch(lhs, rhs, params):
    from ..types.qarray import QArray

    lhs = materialise_checked(lhs) if isinstance(lhs, QArray) else lhs
    rhs = materialise_checked(rhs) if isinstance(rhs, QArray) else rhs
    return jax.lax.dot_general_p.bind(lhs, rhs, **params)
