"""The canonical operand every quantised-matmul kernel takes.

A QArray whose logical shape is [K, N] with its blocks along K (axis 0) and no pending
transpose is passed to kernels as plain arrays in its stored layout:

    data    [Kd, N]   codes. Unpacked formats (int8, emulated ints, fp8): Kd = Kp, one code
                      per element. 4-bit formats: uint8, Kd = Kp / 2, split by halves:
                      byte row i holds logical row i in its low nibble and row i + Kp/2 in
                      its high nibble.
    scales  [nb, N]   float32 per-block scales (double quantisation already undone)
    zeros   [nb, N]   int8 zero points (minmax), or None
    K                 logical rows (Kp = nb * block_size >= K; rows K..Kp-1 are padding)

so W[k, n] = (decode(code[k, n]) - zeros[k // B, n]) * scales[k // B, n].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..formats import Format, get_format
from ..formats._quantize import dequantize_scales
from ._decode import decode_codes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QOperand:
    data: jax.Array
    scales: jax.Array
    zeros: Any
    fmt: Format = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))

    @property
    def n(self) -> int:
        return self.data.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.scales.shape[0]

    @property
    def k_padded(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def halves_aligned(self) -> bool:
        """4-bit formats: whether the high-nibble half starts on a block boundary."""
        return not self.fmt.packed or self.num_blocks % 2 == 0 or self.num_blocks == 1


def stored_operand(w) -> QOperand | None:
    """The kernel operand of a 2-D QArray's storage (ignoring a pending transpose), or None
    when its storage is not [K, N] with blocks along K. Per-tensor scales broadcast to [1, N]."""
    lay = w.layout
    if len(lay.shape) != 2 or lay.axis != 0:
        return None
    fmt = get_format(w.fmt)
    if fmt.kind == "mx":
        scales = dequantize_scales(w.scales, None, None, fmt)
    else:
        scales = dequantize_scales(w.scales, w.dq_scale, w.dq_offset, fmt)
    zeros, n = w.zeros, lay.shape[1]
    if lay.per_tensor:
        scales = jnp.broadcast_to(scales, (1, n))
        zeros = None if zeros is None else jnp.broadcast_to(zeros, (1, n))
    return QOperand(w.data, scales, zeros, fmt, lay.block_size, lay.shape[0])


def canonical_operand(w) -> QOperand | None:
    """The kernel operand for a QArray that is canonical ([K, N], blocks along K, no
    pending transpose), else None."""
    return stored_operand(w) if w.perm is None else None


def pad_k(x: jax.Array, kp: int) -> jax.Array:
    """x [M, K] with zero columns up to kp (a QOperand's stored rows, `k_padded`)."""
    k = x.shape[-1]
    return x if k == kp else jnp.pad(x, ((0, 0), (0, kp - k)))


def reference_dequantize(op: QOperand) -> jax.Array:
    """[K, N] float32: the plain-jnp meaning of a QOperand (for references and tests)."""
    codes = decode_codes(op.data, op.fmt)                       # [Kp, N]
    b = op.block_size
    v = codes.reshape(op.num_blocks, b, op.n)
    if op.zeros is not None:
        v = v - op.zeros.astype(jnp.float32)[:, None, :]
    v = v * op.scales[:, None, :]
    return v.reshape(op.k_padded, op.n)[: op.k]
