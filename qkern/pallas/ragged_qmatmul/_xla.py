"""The `xla` backend of the ragged (grouped) quantised matmul: the stack of experts is
never dequantised, and no expert is read that no row needs.

Schedule. The rows of x are grouped contiguously by expert. Each group is cut into
windows of `tm` rows that start at the group's first row (not at multiples of `tm`: on
XLA a window may start anywhere, and starting at the group makes a group of up to `tm`
rows one window, so one read of its expert). The work items are the windows of all
groups, in row order; their number, sum(ceil(size_e / tm)) <= ceil(M / tm) + E, is known
only at run time, so a `lax.while_loop` walks exactly that many: item j finds its group
by a search in the cumulative window counts, multiplies its window of x by the group's
expert with the 2-D quantised matmul (`qmatmul`: on CPU, the native kernel for small
windows and the K-chunk scan for large ones), and writes the rows of the window that
belong to the group into the output. Every output row belongs to at most one window's
group, so rows are written, never summed; rows past sum(group_sizes) stay zero.
Empty groups cost nothing. Each window's 2-D matmul takes its config as any matmul of
that shape does (`config_for`): on xla that includes dequantise-then-dot for small
weights at M >= 128 (`_config.heuristic_config`), so a window of 128 rows against an
expert of at most 8 MiB in float32 dequantises that one expert, never the stack.

`tm` (`config.block_m`; default `default_tm`): decode groups are a few rows each, and
the window is the matmul's M, so a small window keeps the native kernel's work (which
grows with M) near the rows really present while still reading each expert once; at
prefill the window is large enough that decoding an expert's codes is amortised over
many rows, and small enough that the padding of each group's last window (at most
E * tm rows in all) stays a fraction of M. Measured: bench/ragged_moe.py, docs/moe.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._config import MatmulConfig
from ..qmatmul.api import qmatmul
from ..w8a8.api import w8a8_matmul
from .base import StackedOperand, group_bounds


def default_tm(m: int, experts: int) -> int:
    """Rows per window: a power of two near twice the mean group size (routing is
    uneven), at least 1, at most 128 and at most M rounded up to a power of two. On a
    2-core EPYC (E = 8, K = N = 2048, M = 2048) windows of 128 beat 64, 256 and 512 for
    int8 and nf4; at decode (M = 2 and 32) the mean-group rule picked the best or near it."""
    mean = max(1, -(-2 * m // max(experts, 1)))
    tm = 1 << (mean - 1).bit_length()
    return max(1, min(tm, 128, 1 << (max(m, 1) - 1).bit_length()))


def ragged_xla(x: jax.Array, op: StackedOperand, group_sizes: jax.Array,
               config: MatmulConfig | None = None, *, transposed: bool = False,
               interpret: bool = False, inner: tuple = (None, None), w8a8: bool = False,
               act_scale=None) -> jax.Array:
    """y[M, N] (transposed: [M, K]) = each row of x times its group's expert.

    `inner` is (backend, interpret) for the 2-D `qmatmul` each window runs: the caller's
    selection, so that on a GPU the windows run the Triton kernel. `w8a8`: each window
    runs `w8a8_matmul` instead (int8 activations: per-row scales, or the static
    `act_scale`, so a window's other rows never change a row's result)."""
    m = x.shape[0]
    width = op.k if transposed else op.n
    if m == 0:
        return jnp.zeros((0, width), x.dtype)
    tm = config.block_m if config is not None else default_tm(m, op.experts)
    starts, ends = group_bounds(group_sizes, m)
    windows = (ends - starts + tm - 1) // tm                         # [E]
    last = jnp.cumsum(windows)                                       # items before group e+1
    total = last[-1]
    xp = jnp.pad(x, ((0, tm), (0, 0)))                               # a window never clips
    out0 = jnp.zeros((m + tm, width), x.dtype)
    backend, interp = inner

    def body(carry):
        j, out = carry
        e = jnp.searchsorted(last, j, side="right").astype(jnp.int32)
        row = starts[e] + (j - (last[e] - windows[e])) * tm
        xt = jax.lax.dynamic_slice_in_dim(xp, row, tm, 0)
        if w8a8:
            yt = w8a8_matmul(xt, op.expert(e), act_scale=act_scale, backend=backend,
                             interpret=interp)
        else:
            yt = qmatmul(xt, op.expert(e), transposed=transposed, backend=backend,
                         interpret=interp)
        mine = (row + jnp.arange(tm)) < ends[e]
        cur = jax.lax.dynamic_slice_in_dim(out, row, tm, 0)
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine[:, None], yt, cur),
                                                  row, 0)
        return j + 1, out

    _, out = jax.lax.while_loop(lambda c: c[0] < total, body, (jnp.int32(0), out0))
    return out[:m]


def forward(x, op, group_sizes, config=None, *, interpret=False, inner=(None, None),
            w8a8=False, act_scale=None):
    return ragged_xla(x, op, group_sizes, config, interpret=interpret, inner=inner,
                      w8a8=w8a8, act_scale=act_scale)


def transposed(dy, op, group_sizes, config=None, *, interpret=False, inner=(None, None)):
    return ragged_xla(dy, op, group_sizes, config, transposed=True, interpret=interpret,
                      inner=inner)


# The backend table's protocol: the config search space (`qkern tune` does not tune this
# family yet; `block_m` is the window).
SPACE = dict(block_m=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
MAX_CONFIGS = None


def candidates(problem, op, space: dict, device_kind: str = ""):
    configs = [MatmulConfig(block_m=bm) for bm in space["block_m"]]
    anchor = MatmulConfig(block_m=default_tm(problem.m, getattr(op, "experts", 1)))
    if anchor not in configs:
        configs.append(anchor)
    return configs, [], anchor
