"""W8A8 on the `xla` backend, and the pieces every W8A8 backend shares.

Activations are quantised to int8, an int8 x int8 product is accumulated in int32, then
both scales are applied:

    y[m, n] = sx[m] * sum_b sw[b, n] * sum_{k in b} xq[m, k] * wq[k, n]

The weight must be a symmetric int8 QOperand (per channel, per tensor, or per block along
K). The activation scale sx is either dynamic, the absmax of each row / 127
(`quantize_rows`), or one static scale for the whole tensor (`act_scale`, from
calibration): xq = clip(round(x / act_scale), -127, 127).

Shared with the Pallas backends (_triton_w8a8.py, _mosaic_w8a8.py): `check_w8a8_operand`,
`check_act_scale`, `quantize_activations` (their XLA pre-pass, so every backend feeds its
int8 product with bit-identical codes) and `w8a8_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._compat import explicit_sharding
from ._config import MatmulConfig, default_config
from ._operand import QOperand
from ._xla_qmatmul import (_chunk_rows, chunk_target, dot, padded_spec, product_sharding,
                           zero_acc)

_INT8_MAX = 127.0
_PARTIAL_BYTES = 4 << 20     # xla, per-block scales: bound on one chunk's int32 partials


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float -> (int8 codes [M, K], float32 scales [M, 1]); absmax per row.

    An all-zero row gets scale 0 and codes 0 (no division by zero).
    """
    x32 = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x32), axis=1, keepdims=True) / _INT8_MAX
    q = jnp.round(x32 / jnp.where(s > 0, s, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), s


def quantize_static(x: jax.Array, act_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float, act_scale a float32 scalar -> (int8 codes, float32 scales [M, 1]).

    xq = clip(round(x / act_scale), -127, 127); values beyond 127 * act_scale saturate.
    A zero scale gives y = 0 (it multiplies every product), never a division by zero.
    """
    x32 = x.astype(jnp.float32)
    s = act_scale.astype(jnp.float32)
    q = jnp.round(x32 / jnp.where(s != 0, s, 1.0))
    sx = jnp.broadcast_to(s, (x.shape[0], 1))
    return jnp.clip(q, -127, 127).astype(jnp.int8), sx


def quantize_activations(x: jax.Array, act_scale: jax.Array | None):
    """(int8 codes [M, K], float32 row scales [M, 1]): dynamic per row when act_scale is
    None, else the static per-tensor scale broadcast to every row."""
    return quantize_rows(x) if act_scale is None else quantize_static(x, act_scale)


def check_w8a8_operand(op: QOperand) -> None:
    if not isinstance(op, QOperand):
        raise TypeError(f"W8A8 needs a QOperand (qkern.pallas.stored_operand of an int8 "
                        f"QArray); got {type(op).__name__}.")
    if op.fmt.name != "int8" or op.zeros is not None:
        raise ValueError(
            f"W8A8 needs a symmetric int8 weight; got {op.fmt.name}"
            f"{' with zero points' if op.zeros is not None else ''}. Quantise with "
            "qkern.quantize(w, 'int8') (absmax, rms or a symmetric fixed range).")
    if jnp.dtype(op.data.dtype) != jnp.dtype(jnp.int8):
        raise ValueError(f"W8A8 needs int8 weight codes; got data of dtype {op.data.dtype}.")
    if op.data.ndim != 2 or op.scales.ndim != 2 or op.scales.shape[1] != op.data.shape[1] \
            or op.data.shape[0] != op.k_padded or op.k > op.k_padded:
        raise ValueError(
            f"int8 QOperand shapes disagree: data {op.data.shape}, scales "
            f"{op.scales.shape}, block_size {op.block_size}, K={op.k} (expected data "
            f"[{op.k_padded}, N] and scales [{op.num_blocks}, N]).")


def check_act_scale(act_scale) -> jax.Array | None:
    """None, or the static activation scale as a float32 scalar array.

    Takes a Python number or a scalar floating-point array (traced is fine); anything with
    a shape or an integer dtype is refused.
    """
    if act_scale is None:
        return None
    if isinstance(act_scale, (bool, np.bool_)):
        raise TypeError("act_scale must be a scalar float array, got a bool.")
    if isinstance(act_scale, (int, float, np.integer, np.floating)):
        return jnp.asarray(act_scale, jnp.float32)
    shape = getattr(act_scale, "shape", None)
    dtype = getattr(act_scale, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"act_scale must be a scalar float array or None; got "
                        f"{type(act_scale).__name__}.")
    if tuple(shape) != ():
        raise ValueError(
            f"act_scale must be a scalar (one static scale for the whole activation "
            f"tensor); got shape {tuple(shape)}. For per-row scales pass act_scale=None "
            "(dynamic absmax per row).")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"act_scale must be a floating-point scalar; got dtype {dtype}.")
    return jnp.asarray(act_scale).astype(jnp.float32)


def w8a8_xla(x: jax.Array, op: QOperand, act_scale: jax.Array | None = None,
             config: MatmulConfig | None = None) -> jax.Array:
    """y[M, N] = x[M, K] @ W with x quantised to int8 (per row, or by the static
    act_scale); output in x's dtype. config.block_k: rows per K chunk (None: the xla
    entry of the heuristic table)."""
    check_w8a8_operand(op)
    m, k = x.shape
    if k != op.k:
        raise ValueError(f"x has K={k} but the quantised weight has K={op.k}.")
    xq, sx = quantize_activations(x, act_scale)
    xq = jnp.pad(xq, ((0, 0), (0, op.k_padded - k)))
    target = chunk_target(op, (config or default_config("xla", m)).block_k)
    return (_int8_product(xq, op, target) * sx).astype(x.dtype)


def _int8_product(xq: jax.Array, op: QOperand, target: int) -> jax.Array:
    """float32 [M, N] = sum_b sw[b] * (xq_b @ wq_b), by a scan over K chunks of about
    `target` rows (whole blocks).

    Chunking is for speed and memory, not only style: on a 2-core CPU (K = N = 4096) one
    int8 dot over all of K ran 10x slower than the dense float32 dot at M = 1 (XLA:CPU's
    integer GEMV), where 256-row chunks ran level with it; and one batched dot over every
    block materialised an int32 [blocks, M, N] (10x slower at M = 1, 3x at M = 256), so
    per-block chunks are also capped at _PARTIAL_BYTES of partials (one block at M = 256,
    N = 4096).
    """
    m = xq.shape[0]
    kp, n = op.data.shape
    nb, b = op.num_blocks, op.block_size
    if nb == 1:                                 # per channel / per tensor: int32 throughout
        t = _chunk_rows(kp, kp, 1, target)
        c = kp // t
        if c == 1:
            acc = dot(xq, op.data, jnp.int32)
        else:
            def body(acc, inp):
                return acc + dot(inp[0], inp[1], jnp.int32), None

            xs = (xq.reshape(m, c, t).transpose(1, 0, 2), op.data.reshape(c, t, n))
            acc, _ = jax.lax.scan(body, zero_acc(*xs, jnp.int32), xs)
        return acc.astype(jnp.float32) * op.scales
    # blocks per chunk (divides nb), their int32 partials [g, M, N] kept near cache size
    g_cap = max(1, _PARTIAL_BYTES // (4 * m * n))
    g = nb if target >= kp else _chunk_rows(kp, b, nb, min(target, g_cap * b)) // b
    c = nb // g

    xs = (xq.reshape(m, c, g, b).transpose(1, 2, 0, 3), op.data.reshape(c, g, b, n),
          op.scales.reshape(c, g, n))
    xs = (_batch_sharded_like(xs[0], xs[1]), *xs[1:])
    sharding = product_sharding(xs[0], xs[1])     # Explicit mesh: sum sharded blocks
    kw = {} if sharding is None else {"out_sharding": sharding}

    def body(acc, inp):
        xc, dc, sc = inp                        # [g, M, B], [g, B, N], [g, N]
        part = jax.lax.dot_general(xc, dc, (((2,), (1,)), ((0,), (0,))),
                                   preferred_element_type=jnp.int32)        # [g, M, N]
        return acc + jnp.einsum("gmn,gn->mn", part.astype(jnp.float32), sc, **kw), None

    acc, _ = jax.lax.scan(body, zero_acc(xs[0], xs[1]), xs)
    return acc


def _batch_sharded_like(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a` [C, G, ...] resharded so that its block axis G is sharded like `b`'s, on an
    Explicit mesh (a batched dot_general needs both batch axes sharded alike; jax 0.12
    refuses otherwise). Unchanged elsewhere."""
    sb = explicit_sharding(b)
    if sb is None:
        return a
    want = padded_spec(sb, b.ndim)[1]
    spec = padded_spec(explicit_sharding(a), a.ndim)
    if spec[1] == want:
        return a
    names = set(want) if isinstance(want, tuple) else {want}
    spec = [None if (e in names or (isinstance(e, tuple) and names & set(e))) else e
            for e in spec]
    spec[1] = want
    return jax.sharding.reshard(a, jax.sharding.NamedSharding(sb.mesh,
                                                              jax.sharding.PartitionSpec(*spec)))


def w8a8_reference(x: jax.Array, op: QOperand, act_scale: jax.Array | None = None
                   ) -> jax.Array:
    """Plain-jnp meaning of W8A8: the same activation quantisation, then a float32 product
    of the dequantised activations and weight (materialises W: tests only)."""
    from ._operand import reference_dequantize
    xq, sx = quantize_activations(x, check_act_scale(act_scale))
    y = jnp.dot(xq.astype(jnp.float32) * sx, reference_dequantize(op),
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
