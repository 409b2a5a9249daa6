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

from ..._compat import explicit_sharding, vary_like
from . import _native
from .._config import MatmulConfig, default_config
from .._decode import decode_unpacked, nibble_table, split_nibbles
from .._operand import QOperand, pad_k, reference_dequantize

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


def _decode_chunk(codes, nibble, op: QOperand):
    """Stored codes [t, N] -> unscaled float32 [t, N] (one nibble half for 4-bit formats)."""
    if nibble is None:
        return decode_unpacked(codes, op.fmt)
    if op.fmt.kind == "int":
        # Sign-extend in int8 lanes: shift the nibble to the top, arithmetic shift back.
        top = codes << 4 if nibble == 0 else codes
        signed = jax.lax.bitcast_convert_type(top, jnp.int8)
        return jax.lax.shift_right_arithmetic(signed, jnp.int8(4)).astype(jnp.float32)
    lo, hi = split_nibbles(codes)
    nib = lo if nibble == 0 else hi
    # A 16-entry gather is the cheapest lookup XLA:CPU emits (a 15-select tree, as the
    # Pallas kernels use, ran 5-15% slower at M = 1); nibbles are in range by construction.
    table = jnp.asarray(nibble_table(op.fmt))
    return table.at[nib].get(mode="promise_in_bounds", **_gather_sharding(nib))


def _gather_sharding(index) -> dict:
    """`out_sharding` for a lookup indexed by `index` on an Explicit mesh (JAX otherwise
    refuses to combine a replicated table with a sharded index)."""
    sharding = explicit_sharding(index)
    return {} if sharding is None else {"out_sharding": sharding}


def padded_spec(sharding, ndim: int) -> list:
    """A sharding's PartitionSpec entries, one per dimension (None: unsharded or no
    sharding)."""
    entries = tuple(sharding.spec) if sharding is not None else ()
    return list(entries + (None,) * (ndim - len(entries)))


def product_sharding(a: jax.Array, b: jax.Array):
    """On an Explicit mesh, the sharding of a[..., M, T] @ b[..., T, N]: a's rows, b's columns (a
    sharded contraction is summed across devices, as JAX's own transpose of `x @ w` does).
    None elsewhere."""
    sa, sb = explicit_sharding(a), explicit_sharding(b)
    if sa is None and sb is None:
        return None
    rows, cols = padded_spec(sa, a.ndim)[-2], padded_spec(sb, b.ndim)[-1]
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


def qmatmul_xla(x: jax.Array, op: QOperand, config: MatmulConfig | None = None, *,
                interpret: bool = False) -> jax.Array:
    """y[M, N] = x[M, K] @ W (float32 accumulation, output in x's dtype).

    Where `_native.max_m` allows (small M on an x86-64 CPU; every M with AVX-512 and
    float32 x) this runs the native kernel (qkern/pallas/qmatmul/_native). Otherwise one `lax.scan` over chunks of stored rows: each step
    decodes its chunk (for 4-bit formats both nibble halves of the same bytes), applies
    per-block zero points and scales to the decoded weights while they are in cache, and
    adds the chunk's products.
    Per-channel and per-tensor scales (one block) are applied once, to the result.
    (`interpret` is the Pallas backends' argument; xla has nothing to interpret.)
    """
    config = config or MatmulConfig(block_k=512)
    m, k = x.shape
    if k != op.k:
        raise ValueError(f"x has K={k} but the quantised weight has K={op.k}.")
    if _native.eligible(x, op):    # small M on CPU: the native kernel (qkern/pallas/qmatmul/_native)
        y = _native.qmatmul_small_m(x, op, config)
    else:
        y = _scan_matmul(x, op, config)
    return y.astype(x.dtype)


def dequantized(op: QOperand, after: jax.Array | None = None) -> jax.Array:
    """float32 [K, N], the weight for dequantise-then-dot: the native CPU kernel's decode
    where it runs (`_native.dequantize`, ordered after `after`, the dot's other operand),
    else `reference_dequantize`."""
    if _native.dequantize_eligible(op):
        return _native.dequantize(op, after)
    return reference_dequantize(op)


def _scan_matmul(x: jax.Array, op: QOperand, config: MatmulConfig) -> jax.Array:
    """float32 x @ W by the scan over chunks of stored rows.

    bfloat16 x (a bfloat16 model, or `compute_dtype="bfloat16"`) multiplies each chunk in
    bfloat16: the decoded, scaled chunk is rounded to bfloat16, as `x @ dequantize(q)`
    rounds a bfloat16 weight, and XLA's bfloat16 dot sums in float32. On a CPU with AMX that
    dot is 2-5x faster than float32's (bench/compute_dtype.py: nf4 K = N = 4096, M = 512,
    2.4x of dense float32 against 0.8x with float32 chunks, 2-core Xeon VM). float16 x
    still multiplies in float32: XLA:CPU has no fast float16 dot."""
    m = x.shape[0]
    cdt = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
    xc = pad_k(x.astype(cdt), op.k_padded)
    ch = _Chunks(op, config)
    # x as [c, halves, M, t]: step i, half h multiplies stored rows i*t .. i*t+t-1.
    x_chunks = xc.reshape(m, ch.halves, ch.c, ch.t).transpose(2, 1, 0, 3)
    acc = _scan(x_chunks, ch, op)
    if ch.s_chunks is None:
        if op.zeros is not None:
            xsum = jnp.sum(xc.astype(jnp.float32), axis=1, keepdims=True)
            acc = acc - xsum * op.zeros[0].astype(jnp.float32)
        acc = acc * op.scales[0]
    return acc


class _Chunks:
    """How both kernels walk the stored rows: `c` steps of `t` rows; each step covers `t`
    rows of each of the `halves` streams (the low and high nibbles of 4-bit formats). With
    one scale block (`s_chunks` None) scales and zero points are applied outside the scan;
    otherwise `s_chunks`/`z_chunks` [c, halves, g, N] hold each step's `g` blocks."""

    def __init__(self, op: QOperand, config: MatmulConfig):
        if not op.halves_aligned:
            raise ValueError(f"{op.fmt.name} operand has {op.num_blocks} blocks: the high-nibble "
                             "half must start on a block boundary (an even number of blocks, or one).")
        n, b, nb = op.n, op.block_size, op.num_blocks
        rows = op.data.shape[0]                   # stored rows: Kp, or Kp / 2 for 4-bit
        self.halves = 2 if op.fmt.packed else 1
        self.nibbles = (0, 1) if op.fmt.packed else (None,)
        per_stream = 1 if nb == 1 else nb // self.halves
        self.rows = rows
        self.t = t = _chunk_rows(rows, b, per_stream, chunk_target(op, config.block_k))
        self.c = c = rows // t
        self.d_chunks = op.data.reshape(c, t, n)
        self.s_chunks = self.z_chunks = None
        self.g = t // b
        if nb > 1:
            shape = (self.halves, c, self.g, n)
            self.s_chunks = op.scales.reshape(shape).transpose(1, 0, 2, 3)
            if op.zeros is not None:
                self.z_chunks = op.zeros.reshape(shape).transpose(1, 0, 2, 3).astype(jnp.float32)

    def scan_inputs(self):
        """(d, s, z) per step: s None with one scale block; an empty z when there are no
        per-block zero points (an empty array costs nothing)."""
        z = self.z_chunks if self.z_chunks is not None else jnp.zeros((self.c, 0), jnp.float32)
        return self.d_chunks, self.s_chunks, z

    def decoded(self, dc, sc, zc, h, op: QOperand):
        """Half `h` of one step's rows, decoded, zero points and scales applied: [t, N]."""
        w = _decode_chunk(dc, self.nibbles[h], op)
        if sc is None:
            return w
        n = w.shape[-1]
        w = w.reshape(self.g, -1, n)
        if self.z_chunks is not None:
            w = w - zc[h][:, None, :]
        return (w * sc[h][:, None, :]).reshape(self.t, n)


def _scan(x_chunks, ch: _Chunks, op):
    """Sum over the steps of x's chunk @ the decoded chunk. Scales (and zero points) go on
    the decoded weights, not on partial products: on XLA:CPU the multiply fuses into the
    decode for free, while per-block partial products cost a batched dot (in a standalone
    timing, int4/nf4 with blocks of 64, K = N = 4096, scaling first ran 1.05-1.25x faster
    at M = 1 and M = 16 on a 2-core CPU)."""
    def body(acc, inp):
        xc, dc, sc, zc = inp
        for h in range(ch.halves):
            acc = acc + dot(xc[h], ch.decoded(dc, sc, zc, h, op).astype(xc.dtype))
        return acc, None

    init = zero_acc(x_chunks, ch.d_chunks)
    acc, _ = jax.lax.scan(body, init, (x_chunks,) + ch.scan_inputs())
    return acc


def qmatmul_t_xla(dy: jax.Array, op: QOperand, config: MatmulConfig | None = None, *,
                  interpret: bool = False) -> jax.Array:
    """dx[M, K] = dy[M, N] @ W.T: the gradient with respect to x, from the same storage.

    The same walk as `qmatmul_xla` (both nibble halves of a chunk decoded in one step);
    each step emits its rows of dx instead of accumulating. With one scale block, dy is
    scaled first and the zero-point term is a per-row constant. bfloat16 dy multiplies in
    bfloat16, as the forward scan does."""
    config = config or MatmulConfig(block_k=512)
    m, n = dy.shape
    if n != op.n:
        raise ValueError(f"dy has N={n} but the quantised weight has N={op.n}.")
    dy32 = dy.astype(jnp.float32)
    ch = _Chunks(op, config)
    if ch.s_chunks is None:
        dy32 = dy32 * op.scales[0]

    dyc = dy32.astype(jnp.bfloat16) if dy.dtype == jnp.bfloat16 else dy32

    def body(_, inp):
        dc, sc, zc = inp
        return None, jnp.stack([dot(dyc, ch.decoded(dc, sc, zc, h, op).astype(dyc.dtype).T)
                                for h in range(ch.halves)])        # [halves, M, t]

    _, out = jax.lax.scan(body, None, ch.scan_inputs())           # [c, halves, M, t]
    dx = out.transpose(2, 1, 0, 3).reshape(m, ch.halves * ch.rows)
    if ch.s_chunks is None and op.zeros is not None:
        # from the same (rounded) dy as the product: the two terms must cancel alike
        dx = dx - jnp.sum(dyc.astype(jnp.float32) * op.zeros[0].astype(jnp.float32), axis=1,
                          keepdims=True)
    return dx[:, : op.k].astype(dy.dtype)


_native.SCAN.append(_scan_matmul)   # what the native primitive lowers to where it cannot run


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------

forward = qmatmul_xla
transposed = qmatmul_t_xla

SPACE = dict(block_k=(64, 128, 256, 512, 1024, 2048))
MAX_CONFIGS = None


def chunk_of(op: QOperand, block_k: int) -> int:
    """The K-chunk (stored rows) the scan really uses for a requested block_k."""
    rows = op.data.shape[0]          # stored rows per stream (Kp, or Kp/2 for 4-bit)
    nb = op.num_blocks
    per_stream = 1 if nb == 1 else (nb // 2 if op.fmt.packed else nb)
    return _chunk_rows(rows, op.block_size, per_stream, block_k)


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """xla's space: block_k, the K-chunk of the scan, deduplicated by the chunk the scan
    really uses (`_chunk_rows` rounds to whole scale blocks that divide K). Where the
    native CPU kernel runs (forward, small M) nothing is read from the config."""
    default = default_config("xla", problem.m)
    anchor = MatmulConfig(block_k=chunk_of(op, default.block_k))
    block_ks = space["block_k"]
    if problem.kernel == "qmatmul" and _native.runs_for(problem.m, op, problem.x_dtype):
        pruned = [(MatmulConfig(block_k=bk), "the native CPU kernel runs at this M "
                   "(qkern/pallas/qmatmul/_native); block_k is unused") for bk in block_ks]
        return [anchor], pruned, anchor
    chosen: dict[int, MatmulConfig] = {}
    pruned = []
    for bk in block_ks:
        chunk = chunk_of(op, bk)
        if chunk in chosen:
            pruned.append((MatmulConfig(block_k=bk),
                           f"the scan would use the same chunk of {chunk} rows"))
        else:
            chosen[chunk] = MatmulConfig(block_k=chunk)
    configs = list(chosen.values())
    if anchor not in configs:
        configs.append(anchor)
    return configs, pruned, anchor
