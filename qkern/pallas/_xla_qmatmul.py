"""The `xla` backend of the quantised matmul: plain XLA, for CPUs and as the fallback.

It never materialises the whole dequantised weight: a `lax.scan` walks K in chunks of
`config.block_k` rows; each chunk's codes are decoded, and scaled and
multiplied into the accumulator while they are still in cache. 4-bit formats decode the
low and high nibbles of a chunk's bytes in the same step, against the two halves of x
(see qkern/formats/_packing.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._compat import explicit_sharding, vary_like
from ._config import MatmulConfig
from ._decode import split_nibbles
from ._operand import QOperand

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


def _nibble_table(fmt) -> np.ndarray:
    """The 16 float32 values a 4-bit code stands for (codebook formats, FP4 E2M1)."""
    if fmt.kind == "codebook":
        return np.asarray(fmt.codebook, np.float32)
    # mx: the element dtype's 16 bit patterns (ml_dtypes keeps a 4-bit float in a byte)
    return np.arange(16, dtype=np.uint8).view(np.dtype(fmt.float_dtype)).astype(np.float32)


def _decode_chunk(codes, nibble, op: QOperand):
    """Stored codes [t, N] -> unscaled float32 [t, N] (one nibble half for 4-bit formats)."""
    if nibble is None:
        return codes.astype(jnp.float32)
    if op.fmt.kind == "int":
        # Sign-extend in int8 lanes: shift the nibble to the top, arithmetic shift back.
        top = codes << 4 if nibble == 0 else codes
        signed = jax.lax.bitcast_convert_type(top, jnp.int8)
        return jax.lax.shift_right_arithmetic(signed, jnp.int8(4)).astype(jnp.float32)
    lo, hi = split_nibbles(codes)
    nib = lo if nibble == 0 else hi
    # A 16-entry gather is the cheapest lookup XLA:CPU emits (a 15-select tree, as the
    # Pallas kernels use, ran 5-15% slower at M = 1); nibbles are in range by construction.
    table = jnp.asarray(_nibble_table(op.fmt))
    return table.at[nib].get(mode="promise_in_bounds", **_gather_sharding(nib))


def _gather_sharding(index) -> dict:
    """`out_sharding` for a lookup indexed by `index` on an Explicit mesh (JAX otherwise
    refuses to combine a replicated table with a sharded index)."""
    sharding = explicit_sharding(index)
    return {} if sharding is None else {"out_sharding": sharding}


def product_sharding(a: jax.Array, b: jax.Array):
    """On an Explicit mesh, the sharding of a[..., M, T] @ b[..., T, N]: a's rows, b's columns (a
    sharded contraction is summed across devices, as JAX's own transpose of `x @ w` does).
    None elsewhere."""
    sa, sb = explicit_sharding(a), explicit_sharding(b)
    if sa is None and sb is None:
        return None

    def spec(s, nd):
        entries = tuple(s.spec) if s is not None else ()
        return entries + (None,) * (nd - len(entries))

    rows, cols = spec(sa, a.ndim)[-2], spec(sb, b.ndim)[-1]
    if rows is not None and rows == cols:
        cols = None
    return jax.sharding.NamedSharding((sa or sb).mesh, jax.sharding.PartitionSpec(rows, cols))


def dot(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """a[M, T] @ b[T, N] accumulated in `dtype` (sharded by `_out_sharding` on an Explicit
    mesh)."""
    sharding = product_sharding(a, b)
    kw = {} if sharding is None else {"out_sharding": sharding}
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=dtype, **kw)


def zero_acc(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Zeros [M, N] typed like `dot(a, b)` (a[..., M, T], b[..., T, N]: whole scan inputs
    do): a scan's initial carry. Plain `jnp.zeros` is
    replicated; the carry must match what the body produces: sharded like the product on
    an Explicit mesh, and varying over the operands' manual axes inside `shard_map`."""
    sharding = product_sharding(a, b)
    kw = {} if sharding is None else {"out_sharding": sharding}
    return vary_like(jnp.zeros((a.shape[-2], b.shape[-1]), dtype, **kw), a, b)


def chunk_target(op: QOperand, block_k: int) -> int:
    """Rows per scan chunk to aim for: `block_k`, or all of them when the weight's K axis is
    sharded on an Explicit mesh (`lax.scan` cannot step along a sharded axis; each device
    then decodes its own K shard whole and the partial products are summed across
    devices)."""
    sharding = explicit_sharding(op.data)
    if sharding is not None and tuple(sharding.spec)[:1] not in ((), (None,)):
        return op.data.shape[0]
    return block_k


def _pad_k(x: jax.Array, kp: int) -> jax.Array:
    k = x.shape[-1]
    return x if k == kp else jnp.pad(x, ((0, 0), (0, kp - k)))


def qmatmul_xla(x: jax.Array, op: QOperand, config: MatmulConfig | None = None) -> jax.Array:
    """y[M, N] = x[M, K] @ W (float32 accumulation, output in x's dtype).

    One `lax.scan` over chunks of stored rows. Each step decodes its chunk (for 4-bit
    formats both nibble halves of the same bytes), applies per-block zero points and
    scales to the decoded weights while they are in cache, and adds the chunk's products.
    Per-channel and per-tensor scales (one block) are applied once, to the result.
    """
    config = config or MatmulConfig(block_k=512)
    m, k = x.shape
    if k != op.k:
        raise ValueError(f"x has K={k} but the quantised weight has K={op.k}.")
    if not op.halves_aligned:
        raise ValueError(f"{op.fmt.name} operand has {op.num_blocks} blocks: the high-nibble "
                         "half must start on a block boundary (an even number of blocks, or one).")
    x32 = _pad_k(x.astype(jnp.float32), op.k_padded)
    n, b, nb = op.n, op.block_size, op.num_blocks
    rows = op.data.shape[0]                       # stored rows: Kp, or Kp / 2 for 4-bit
    halves = 2 if op.fmt.packed else 1
    nibbles = (0, 1) if op.fmt.packed else (None,)
    per_stream = 1 if nb == 1 else nb // halves
    t = _chunk_rows(rows, b, per_stream, chunk_target(op, config.block_k))
    c = rows // t
    # x as [c, halves, M, t]: step i, half h multiplies stored rows i*t .. i*t+t-1.
    x_chunks = x32.reshape(m, halves, c, t).transpose(2, 1, 0, 3)
    d_chunks = op.data.reshape(c, t, n)
    if nb == 1:
        acc = _scan_unscaled(x_chunks, d_chunks, nibbles, op)
        if op.zeros is not None:
            acc = acc - jnp.sum(x32, axis=1, keepdims=True) * op.zeros[0].astype(jnp.float32)
        return (acc * op.scales[0]).astype(x.dtype)
    g = t // b
    s_chunks = op.scales.reshape(halves, c, g, n).transpose(1, 0, 2, 3)
    z_chunks = None
    if op.zeros is not None:
        z_chunks = op.zeros.reshape(halves, c, g, n).transpose(1, 0, 2, 3).astype(jnp.float32)
    return _scan_blocked(x_chunks, d_chunks, s_chunks, z_chunks, nibbles, op, g, b).astype(x.dtype)


def _scan_unscaled(x_chunks, d_chunks, nibbles, op):
    def body(acc, inp):
        xc, dc = inp
        for h, nibble in enumerate(nibbles):
            acc = acc + dot(xc[h], _decode_chunk(dc, nibble, op))
        return acc, None

    acc, _ = jax.lax.scan(body, zero_acc(x_chunks, d_chunks), (x_chunks, d_chunks))
    return acc


def _scan_blocked(x_chunks, d_chunks, s_chunks, z_chunks, nibbles, op, g, b):
    """Scales (and zero points) go on the decoded weights, not on partial products: on
    XLA:CPU the multiply fuses into the decode for free, while per-block partial products
    cost a batched dot (in a standalone timing, int4/nf4 with blocks of 64, K = N = 4096,
    scaling first ran 1.05-1.25x faster at M = 1 and M = 16 on a 2-core CPU)."""
    n = d_chunks.shape[2]
    t = g * b
    has_zeros = z_chunks is not None
    if not has_zeros:  # scan needs an array per step; an empty one costs nothing
        z_chunks = jnp.zeros((x_chunks.shape[0], 0), jnp.float32)

    def body(acc, inp):
        xc, dc, sc, zc = inp
        for h, nibble in enumerate(nibbles):
            w = _decode_chunk(dc, nibble, op).reshape(g, b, n)
            if has_zeros:
                w = w - zc[h][:, None, :]
            w = (w * sc[h][:, None, :]).reshape(t, n)
            acc = acc + dot(xc[h], w)
        return acc, None

    init = zero_acc(x_chunks, d_chunks)
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
        t = _chunk_rows(rows, b, nbs, chunk_target(op, config.block_k))
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
            return None, dot(dy32, w.T)                     # [M, t]

        _, out = jax.lax.scan(body, None, (d_chunks, s_rows, zs))   # [c, M, t]
        pieces.append(out.transpose(1, 0, 2).reshape(m, rows))
    dx = jnp.concatenate(pieces, axis=1)[:, : op.k]
    return dx.astype(dy.dtype)
