"""The Triton grouped kernel (qkern/pallas/ragged_qmatmul/_triton.py): numerics in
interpret mode against the reference, and the real Triton lowering (exported for `cuda`
on this CPU host). It has not run on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern import _compat
from qkern.pallas import MatmulConfig
from qkern.pallas.ragged_qmatmul import base
from qkern.pallas.ragged_qmatmul._triton import ragged_triton, work_items
from qkern.types._qarray_ragged import stacked_operand

E, K, N = 4, 200, 96          # K padded to whole blocks, N not a multiple of the tile

FORMATS = [("int8", {}), ("int8", dict(block_size=64)), ("nf4", {}),
           ("int4", dict(block_size=64, calibration="minmax")), ("fp8_e4m3", {})]
GROUPS = [(10, [3, 0, 5, 1]), (1, [0, 1, 0, 0]), (40, [17, 0, 0, 20]), (40, [0, 0, 0, 0]),
          (33, [16, 1, 15, 1])]


def _op(fmt, kw, dtype=jnp.float32):
    w = jax.random.normal(jax.random.PRNGKey(0), (E, K, N)).astype(dtype)
    return stacked_operand(qkern.quantize(w, fmt, axis=-2, **kw))


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=[f"{f}-{k}" for f, k in FORMATS])
@pytest.mark.parametrize("m, sizes", GROUPS)
def test_interpret_matches_the_reference(fmt, kw, m, sizes):
    op = _op(fmt, kw)
    x = jax.random.normal(jax.random.PRNGKey(1), (m, K))
    g = jnp.asarray(sizes, jnp.int32)
    got = ragged_triton(x, op, g, interpret=True)
    np.testing.assert_allclose(got, base.reference(x, op, g), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cfg", [MatmulConfig(block_m=16, block_n=32, block_k=32),
                                 MatmulConfig(block_m=32, block_n=128, block_k=128)])
def test_interpret_bfloat16_and_configs(cfg):
    op = _op("nf4", {}, jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (37, K)).astype(jnp.bfloat16)
    g = jnp.asarray([9, 20, 0, 5])
    got = ragged_triton(x, op, g, cfg, interpret=True)
    assert got.dtype == jnp.bfloat16
    want = base.reference(x, op, g)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))


def test_work_items_cover_each_group_tile_once():
    g = jnp.asarray([5, 0, 20, 3, 0], jnp.int32)             # M = 30, tiles of 8
    group, tile, count = work_items(g, 30, 8, 5)
    assert group.shape == (4 + 5 - 1,)
    pairs = list(zip(np.asarray(group)[: int(count[0])].tolist(),
                     np.asarray(tile)[: int(count[0])].tolist()))
    # group 0: rows 0-4 (tile 0); group 2: rows 5-24 (tiles 0-3); group 3: rows 25-27 (tile 3)
    assert pairs == [(0, 0), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3)]


def test_quaxify_under_triton_runs_the_grouped_kernel_and_its_gradient():
    w = jax.random.normal(jax.random.PRNGKey(0), (E, K, N))
    q = qkern.quantize(w, "int4", axis=-2)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, K))
    g = jnp.asarray([4, 0, 6, 1])
    f = qkern.quaxify(lambda q, x: jax.lax.ragged_dot(x, q, g))
    with qkern.backend("triton", interpret=True):
        assert "ragged_qmatmul_triton" in str(jax.make_jaxpr(f)(q, x))
        y = f(q, x)
        dx = jax.grad(lambda x: jnp.sum(f(q, x) ** 2))(x)
    wd = qkern.dequantize(q)
    np.testing.assert_allclose(y, jax.lax.ragged_dot(x, wd, g, precision="highest"),
                               rtol=1e-5, atol=1e-4)
    want = jax.grad(lambda x: jnp.sum(jax.lax.ragged_dot(x, wd, g, precision="highest") ** 2))(x)
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=[f"{f}-{k}" for f, k in FORMATS])
@pytest.mark.parametrize("m", [3, 40])
def test_lowers_for_triton(fmt, kw, m):
    op = _op(fmt, kw)
    x = jnp.ones((m, K), jnp.bfloat16)
    g = jnp.asarray([1, 1, 0, 1], jnp.int32)
    text = _compat.export(lambda x, op, g: ragged_triton(x, op, g), "cuda", x, op, g).mlir_module()
    assert _compat.TRITON_CUSTOM_CALL in text


def test_forward_and_gradient_through_quaxify_lower_for_triton():
    q = qkern.quantize(jax.random.normal(jax.random.PRNGKey(0), (E, K, N)), "nf4", axis=-2)
    g = jnp.asarray([1, 1, 0, 1], jnp.int32)
    f = qkern.quaxify(lambda q, x, g: jnp.sum(jax.lax.ragged_dot(x, q, g) ** 2))
    with qkern.backend("triton"):
        text = _compat.export(jax.grad(f, argnums=1), "cuda", q, jnp.ones((5, K)), g
                              ).mlir_module()
    assert text.count(_compat.TRITON_CUSTOM_CALL) >= 2     # grouped forward, 2-D transposed
