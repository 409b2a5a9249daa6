"""The `xla` backend of the quantised matmul: plain XLA, for CPUs and as the fallback.

It never materialises the whole dequantised weight: a `lax.scan` walks K in chunks of
`config.block_k` rows; each chunk's codes are decoded, and multiplied into the
accumulator while they are still in cache. For small M the per-block scales are applied
to the chunk's partial products rather than to the decoded weights (M x N multiplies per
block instead of B x N). 4-bit formats decode the low and high nibbles of a chunk against
the two halves of x (see qkern/formats/_packing.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._compat import vary_like
from ._config import MatmulConfig
from ._decode import decode_nibbles, split_nibbles
from ._operand import QOperand

# Below this many rows of x, scales multiply partial products instead of weights.
SCALE_AFTER_MAX_M = 32


def _chunk_rows(rows: int, block: int, per_stream_blocks: int, target: int) -> int:
    """Rows per chunk: a whole number of blocks that divides `rows`, near `target`."""
    if per_stream_blocks <= 1:  # one scale row for the whole stream: any divisor works
        best = rows
        for t in range(min(rows, max(target, 1)), 0, -1):
            if rows % t == 0:
                best = t
                break
        return best if best >= min(64, rows) else rows
    g = max(1, min(per_stream_blocks, target // block))
    while per_stream_blocks % g:
        g -= 1
    return g * block


def _streams(x32: jax.Array | None, op: QOperand):
    """[(x part [M, R] or None, which nibble or None, scales [nbs, N], zeros or None)]."""
    nb = op.num_blocks
    if not op.fmt.packed:
        return [(x32, None, op.scales, op.zeros)]
    half = op.data.shape[0]
    if nb == 1:
        s_lo = s_hi = op.scales
        z_lo = z_hi = op.zeros
    else:
        s_lo, s_hi = op.scales[: nb // 2], op.scales[nb // 2:]
        z_lo, z_hi = (None, None) if op.zeros is None else (op.zeros[: nb // 2], op.zeros[nb // 2:])
    lo, hi = (None, None) if x32 is None else (x32[:, :half], x32[:, half:])
    return [(lo, 0, s_lo, z_lo), (hi, 1, s_hi, z_hi)]


def _decode_chunk(codes, nibble, op: QOperand):
    if nibble is None:
        return codes.astype(jnp.float32)
    if op.fmt.kind == "int":
        # Sign-extend in int8 lanes: shift the nibble to the top, arithmetic shift back.
        top = codes << 4 if nibble == 0 else codes
        signed = jax.lax.bitcast_convert_type(top, jnp.int8)
        return jax.lax.shift_right_arithmetic(signed, jnp.int8(4)).astype(jnp.float32)
    lo, hi = split_nibbles(codes)
    nib = lo if nibble == 0 else hi
    if op.fmt.kind == "codebook":  # a gather is the cheapest lookup XLA:CPU emits
        return jnp.asarray(op.fmt.codebook)[nib]
    return decode_nibbles(nib, op.fmt)


def _pad_k(x: jax.Array, kp: int) -> jax.Array:
    k = x.shape[-1]
    return x if k == kp else jnp.pad(x, ((0, 0), (0, kp - k)))


def qmatmul_xla(x: jax.Array, op: QOperand, config: MatmulConfig | None = None) -> jax.Array:
    """y[M, N] = x[M, K] @ W (float32 accumulation, output in x's dtype)."""
    config = config or MatmulConfig(block_k=512)
    m, k = x.shape
    if k != op.k:
        raise ValueError(f"x has K={k} but the quantised weight has K={op.k}.")
    x32 = _pad_k(x.astype(jnp.float32), op.k_padded)
    n, b = op.n, op.block_size
    acc = jnp.zeros((m, n), jnp.float32)
    for xs, nibble, scales, zeros in _streams(x32, op):
        rows = xs.shape[1]
        nbs = scales.shape[0] if scales.shape[0] > 1 else 1
        t = _chunk_rows(rows, b, nbs, config.block_k)
        c = rows // t
        x_chunks = xs.reshape(m, c, t).transpose(1, 0, 2)
        d_chunks = op.data.reshape(c, t, n)
        if nbs == 1:
            partial = _scan_single_scale(x_chunks, d_chunks, nibble, op)
            if zeros is not None:
                partial = partial - jnp.sum(xs, axis=1, keepdims=True) * zeros[0].astype(jnp.float32)
            acc = acc + partial * scales[0]
            continue
        g = t // b
        s_chunks = scales.reshape(c, g, n)
        z_chunks = None if zeros is None else zeros.reshape(c, g, n).astype(jnp.float32)
        acc = acc + _scan_blocked(x_chunks, d_chunks, s_chunks, z_chunks, nibble, op, g, b)
    return acc.astype(x.dtype)


def _scan_single_scale(x_chunks, d_chunks, nibble, op):
    m, n = x_chunks.shape[1], d_chunks.shape[2]

    def body(acc, inp):
        xc, dc = inp
        return acc + jnp.dot(xc, _decode_chunk(dc, nibble, op)), None

    init = vary_like(jnp.zeros((m, n), jnp.float32), x_chunks, d_chunks)
    acc, _ = jax.lax.scan(body, init, (x_chunks, d_chunks))
    return acc


def _scan_blocked(x_chunks, d_chunks, s_chunks, z_chunks, nibble, op, g, b):
    m, n = x_chunks.shape[1], d_chunks.shape[2]
    after = m <= SCALE_AFTER_MAX_M
    has_zeros = z_chunks is not None
    if not has_zeros:  # scan needs an array per step; an empty one costs nothing
        z_chunks = jnp.zeros((x_chunks.shape[0], 0), jnp.float32)

    def body(acc, inp):
        xc, dc, sc, zc = inp
        w = _decode_chunk(dc, nibble, op)                       # [t, N] unscaled
        if after:
            xb = xc.reshape(m, g, b)
            part = jnp.einsum("mgb,gbn->gmn", xb, w.reshape(g, b, n))
            if has_zeros:
                part = part - jnp.sum(xb, axis=2).T[:, :, None] * zc[:, None, :]
            return acc + jnp.einsum("gmn,gn->mn", part, sc), None
        w = w.reshape(g, b, n)
        if has_zeros:
            w = w - zc[:, None, :]
        w = (w * sc[:, None, :]).reshape(g * b, n)
        return acc + jnp.dot(xc, w), None

    init = vary_like(jnp.zeros((m, n), jnp.float32), x_chunks, d_chunks, s_chunks, z_chunks)
    acc, _ = jax.lax.scan(body, init, (x_chunks, d_chunks, s_chunks, z_chunks))
    return acc


def qmatmul_t_xla(dy: jax.Array, op: QOperand, config: MatmulConfig | None = None) -> jax.Array:
    """dx[M, K] = dy[M, N] @ W.T: the gradient with respect to x, from the same storage."""
    config = config or MatmulConfig(block_k=512)
    m, n = dy.shape
    if n != op.n:
        raise ValueError(f"dy has N={n} but the quantised weight has N={op.n}.")
    dy32 = dy.astype(jnp.float32)
    b = op.block_size
    pieces = []
    rows = op.data.shape[0]  # stored rows per stream: Kp, or Kp/2 for each nibble half
    for _, nibble, scales, zeros in _streams(None, op):
        nbs = scales.shape[0] if scales.shape[0] > 1 else 1
        t = _chunk_rows(rows, b, nbs, config.block_k)
        c = rows // t
        d_chunks = op.data.reshape(c, t, n)
        if nbs == 1:
            s_rows = jnp.broadcast_to(scales[0], (c, 1, n))
            z_rows = None if zeros is None else jnp.broadcast_to(zeros[0], (c, 1, n))
            g, bb = 1, t
        else:
            g, bb = t // b, b
            s_rows = scales.reshape(c, g, n)
            z_rows = None if zeros is None else zeros.reshape(c, g, n)

        has_zeros = z_rows is not None
        zs = z_rows if has_zeros else jnp.zeros((c, 0), jnp.int8)

        def body(_, inp, g=g, bb=bb, nibble=nibble, has_zeros=has_zeros):
            dc, sc, zc = inp
            w = _decode_chunk(dc, nibble, op).reshape(g, bb, n)
            if has_zeros:
                w = w - zc.astype(jnp.float32)[:, None, :]
            w = (w * sc[:, None, :]).reshape(g * bb, n)
            return None, jnp.dot(dy32, w.T)                     # [M, t]

        _, out = jax.lax.scan(body, None, (d_chunks, s_rows, zs))   # [c, M, t]
        pieces.append(out.transpose(1, 0, 2).reshape(m, rows))
    dx = jnp.concatenate(pieces, axis=1)[:, : op.k]
    return dx.astype(dy.dtype)
