"""W8A8 on the `xla` backend.

Activations are quantised to int8, an int8 x int8 product is accumulated in int32, then
both scales are applied:

    y[m, n] = sx[m] * sum_b sw[b, n] * sum_{k in b} xq[m, k] * wq[k, n]

The weight must be a symmetric int8 QOperand (per channel, per tensor, or per block along
K). The activation scale sx is either dynamic, the absmax of each row / 127
(`quantize_rows`), or one static scale for the whole tensor (`act_scale`, from
calibration): xq = clip(round(x / act_scale), -127, 127).

Below M = NATIVE_BELOW on an x86-64 CPU, the int8 product is the native CPU kernel's
(qkern/pallas/qmatmul/_native, the weight-only int8 kernel) fed the codes of x as float32:
its streaming path, which runs there, sums each block's products of small integers unscaled
and scales once, so while a block's partial sums stay below 2^24 in magnitude (always for
K < 1040) each block's sum is exact: per channel (or per tensor) the result is the int32
product's bit for bit; per block, the scaled block sums are added in another order. Beyond
2^24 a sum rounds as float32 does (6e-8). At M = 1, K = N = 4096 it ran at 2.0-3.0x dense
float32 (weight-only int8: 2.8-3.0x), where XLA:CPU's integer GEMV ran at 0.4x. Under vmap a
batch folds into M only while it stays below NATIVE_BELOW rows; wider batches, and
lowerings where the kernel cannot run (other platforms, several devices, `jax.export`),
take the int8 product below (`_int8_fallback`), as every call from NATIVE_BELOW rows does.
From M = NATIVE_BELOW a per-channel (or per-tensor) weight is multiplied by one int8 dot
over the whole of K (`_config.heuristic_config`; XLA:CPU runs it on AMX or VNNI where the
CPU has them); a per-block one by a scan over K chunks.

The checks, the activation pre-pass every backend shares and the reference are in base.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..._compat import explicit_sharding
from .._config import MatmulConfig, Problem, heuristic_config
from .._operand import QOperand, pad_k
from .base import check_w8a8_operand, quantize_activations
from ..qmatmul import _native
from ..qmatmul import _xla as qmatmul_xla
from ..qmatmul._xla import (_chunk_rows, chunk_target, dot, padded_spec, product_sharding,
                           zero_acc)

_PARTIAL_BYTES = 4 << 20     # xla, per-block scales: bound on one chunk's int32 partials
# Rows of x below which the native kernel multiplies (its streaming path: exact integer sums)
# where it can run: below the register-tiled kernel's first M. At M = 8 its register-tiled
# path, which scales each code before summing (so the sums are no longer exact), and XLA's
# int8 dot over the whole of K each won at two of the four shapes timed (MiniLM's 384 x 1536 and 1536 x 384 went to XLA; 384 x 384 and
# 4096 x 4096 to the kernel).
NATIVE_BELOW = _native.STREAMING_BELOW


def w8a8_xla(x: jax.Array, op: QOperand, act_scale: jax.Array | None = None,
             config: MatmulConfig | None = None, *, interpret: bool = False) -> jax.Array:
    """y[M, N] = x[M, K] @ W with x quantised to int8 (per row, or by the static
    act_scale); output in x's dtype. config.block_k: rows per K chunk (None:
    `_config.heuristic_config`, the whole of K from M = 8). Below NATIVE_BELOW rows the
    native CPU kernel runs where it can (the module docstring)."""
    check_w8a8_operand(op)
    m, k = x.shape
    if k != op.k:
        raise ValueError(f"x has K={k} but the quantised weight has K={op.k}.")
    xq, sx = quantize_activations(x, act_scale)
    config = config or heuristic_config(Problem.of("xla", x, op, "w8a8"))
    if m < NATIVE_BELOW and _native.eligible(x, op):
        # codes as float32: exact small integers (the module docstring)
        y = _native.qmatmul_small_m(xq.astype(jnp.float32), op, config, int8_codes=True)
        return (y * sx).astype(x.dtype)
    return (_int8_matmul(xq, op, config) * sx).astype(x.dtype)


def chunk_rows(op: QOperand, m: int, target: int) -> int:
    """Stored rows per chunk of the int8 product for M rows and a target of `target` rows:
    whole blocks that divide K; per-block chunks also keep their int32 partials [g, M, N]
    near cache size (_PARTIAL_BYTES)."""
    kp, n = op.data.shape
    nb, b = op.num_blocks, op.block_size
    if nb == 1:
        return _chunk_rows(kp, kp, 1, target)
    g_cap = max(1, _PARTIAL_BYTES // (4 * max(m, 1) * n))
    if target >= kp and g_cap >= nb:
        return kp
    return _chunk_rows(kp, b, nb, min(target, g_cap * b))


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
        t = chunk_rows(op, m, target)
        c = kp // t
        if c == 1:
            acc = dot(xq, op.data, jnp.int32)
        else:
            def body(acc, inp):
                return acc + dot(inp[0], inp[1], jnp.int32), None

            xs = (xq.reshape(m, c, t).transpose(1, 0, 2), op.data.reshape(c, t, n))
            acc, _ = jax.lax.scan(body, zero_acc(*xs, jnp.int32), xs)
        return acc.astype(jnp.float32) * op.scales
    g = chunk_rows(op, m, target) // b          # blocks per chunk (divides nb)
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


def _int8_matmul(xq: jax.Array, op: QOperand, config: MatmulConfig) -> jax.Array:
    """float32 [M, N]: the int8 product of the unpadded int8 codes xq [M, K] by op, in K
    chunks of about config.block_k rows."""
    return _int8_product(pad_k(xq, op.k_padded), op, chunk_target(op, config.block_k))


def _int8_fallback(x2: jax.Array, op: QOperand, config: MatmulConfig) -> jax.Array:
    """`_int8_matmul` of x2, int8 codes held as float32: where the native primitive W8A8
    binds cannot run the kernel (the module docstring)."""
    return _int8_matmul(x2.astype(jnp.int8), op, config)


_native.INT8_PRODUCT.append(_int8_fallback)


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


# --------------------------------------------------------------------------------------
# The backend table's names, and the config search space (`qkern tune`)
# --------------------------------------------------------------------------------------


def forward(x, op, config=None, *, act_scale=None, interpret=False):
    return w8a8_xla(x, op, act_scale, config)


SPACE = qmatmul_xla.SPACE
MAX_CONFIGS = None


def candidates(problem, op: QOperand, space: dict, device_kind: str = ""):
    """block_k, the K chunk of the int8 product, deduplicated by the chunk really used.
    Where the native CPU kernel runs (M < NATIVE_BELOW) nothing is read from the config."""
    anchor = heuristic_config(problem)
    if problem.m < NATIVE_BELOW and _native.runs_for(problem.m, op):
        pruned = [(MatmulConfig(block_k=bk), "the native CPU kernel runs at this M "
                   "(qkern/pallas/qmatmul/_native); block_k is unused")
                  for bk in space["block_k"]]
        return [anchor], pruned, anchor
    chosen: dict[int, MatmulConfig] = {}
    pruned = []
    for bk in space["block_k"]:
        chunk = chunk_rows(op, problem.m, chunk_target(op, bk))
        if chunk in chosen:
            pruned.append((MatmulConfig(block_k=bk),
                           f"the product would use the same chunk of {chunk} rows"))
        else:
            chosen[chunk] = MatmulConfig(block_k=bk)
    configs = list(chosen.values())
    if chunk_rows(op, problem.m, chunk_target(op, anchor.block_k)) not in chosen:
        configs.append(anchor)
    return configs, pruned, anchor
