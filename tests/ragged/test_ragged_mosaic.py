"""The Mosaic TPU grouped kernel (qkern/pallas/ragged_qmatmul/_mosaic.py), without a TPU:
numerics in interpret mode against an independent per-group numpy reference (also under
the TPU interpreter's race detector, whose out-of-bounds block rows are 0xFF bytes, a
float8 NaN: the fp8 case with a ragged K tail pins the mask), the gradient through the
backend, the fallback for operands the 2-D Mosaic kernels refuse, and the real Mosaic
lowering (exported for `tpu` on this CPU host). It has not run on a TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import qkern
from qkern import _compat
from qkern.pallas import MatmulConfig, _backend
from qkern.pallas.ragged_qmatmul import ragged_qmatmul
from qkern.pallas.ragged_qmatmul._mosaic import item_table, plan_ragged, ragged_mosaic
from qkern.types._qarray_ragged import stacked_operand

E, K, N = 4, 256, 200         # N not a multiple of 128: a ragged last N tile

FORMATS = [("int8", {}), ("int8", dict(block_size=64)), ("nf4", {}),
           ("int4", dict(block_size=64, calibration="minmax")), ("fp8_e4m3", {})]
# (M, group sizes): empty groups, one-row groups, sum < M, M = 1, all empty
GROUPS = [(10, [3, 0, 5, 1]), (1, [0, 1, 0, 0]), (20, [1, 0, 12, 1]), (20, [0, 0, 0, 0])]
# 8-row tiles: groups straddle row tiles, row tiles shared by several items, tiles no item
# visits (past the sum), and several K steps (4-bit, blocks of 64: 8 scale rows per
# 512-row K tile, per stream, at K = 2048)
SMALL_TILES = MatmulConfig(block_m=8, block_n=128, block_k=512)


def _q(fmt, kw, k=K, dtype=jnp.float32):
    w = jax.random.normal(jax.random.PRNGKey(0), (E, k, N)).astype(dtype)
    return qkern.quantize(w, fmt, axis=-2, **kw)


def numpy_reference(x, q, sizes):
    """Row by row of each group, in float64 numpy, from the dequantised experts."""
    w = np.asarray(qkern.dequantize(q), np.float64)            # [E, K, N]
    x = np.asarray(x, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, size in enumerate(sizes):
        end = min(start + size, x.shape[0])
        y[start:end] = x[start:end] @ w[e]
        start = end
    return y


def _check(got, want, rtol=1e-5, atol=1e-4):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=[f"{f}-{k}" for f, k in FORMATS])
@pytest.mark.parametrize("m, sizes", GROUPS)
def test_interpret_matches_the_numpy_reference(fmt, kw, m, sizes):
    q = _q(fmt, kw)
    x = jax.random.normal(jax.random.PRNGKey(1), (m, K))
    got = ragged_mosaic(x, stacked_operand(q), jnp.asarray(sizes, jnp.int32), interpret=True)
    assert got.shape == (m, N) and got.dtype == x.dtype
    _check(got, numpy_reference(x, q, sizes))


@pytest.mark.parametrize("fmt, kw", [("nf4", {}), ("int8", {}), ("fp8_e4m3", {}),
                                     ("int4", dict(block_size=64, calibration="minmax"))])
def test_small_row_tiles_and_several_k_steps(fmt, kw):
    q = _q(fmt, kw, k=2048)
    op = stacked_operand(q)
    sizes = [5, 0, 14, 1]                       # rows 0-4, 5-18, 19; 20-29 in no group
    x = jax.random.normal(jax.random.PRNGKey(2), (30, 2048))
    plan = plan_ragged(op, 30, x.dtype, SMALL_TILES)
    assert (plan.bm, plan.nn) == (8, 2) and plan.nk == (2 if fmt.endswith("4") else 4)
    got = ragged_mosaic(x, op, jnp.asarray(sizes), SMALL_TILES, interpret=True)
    _check(got, numpy_reference(x, q, sizes))
    assert (np.asarray(got[20:]) == 0).all()


def test_item_table_repeats_the_last_item_in_the_padding_slots():
    g = jnp.asarray([5, 0, 20, 3, 0], jnp.int32)             # M = 30, tiles of 8
    group, tile, count = item_table(g, 30, 8, 5)
    assert int(count[0]) == 6 and group.shape == (4 + 5 - 1,)
    assert list(zip(np.asarray(group).tolist(), np.asarray(tile).tolist())) == [
        (0, 0), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3), (3, 3), (3, 3)]


def test_bfloat16():
    q = _q("nf4", {}, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (37, K)).astype(jnp.bfloat16)
    sizes = [9, 20, 0, 5]
    cfg = MatmulConfig(block_m=16, block_n=128, block_k=512)
    got = ragged_mosaic(x, stacked_operand(q), jnp.asarray(sizes), cfg, interpret=True)
    assert got.dtype == jnp.bfloat16
    want = numpy_reference(np.asarray(x, np.float32), q, sizes)
    _check(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_no_races_and_the_masked_fp8_k_tail():
    """Two simulated cores over the parallel N axis; K = 1000 per channel gives 4 K steps
    of 256 rows with a partial last one, which the TPU interpreter fills with 0xFF."""
    q = _q("fp8_e4m3", {}, k=1000)
    op = stacked_operand(q)
    x = jax.random.normal(jax.random.PRNGKey(3), (12, 1000))
    sizes = [3, 0, 6, 2]
    cfg = MatmulConfig(block_m=8, block_n=128, block_k=256)
    assert plan_ragged(op, 12, x.dtype, cfg).mask_k
    pltpu.reset_tpu_interpret_mode_state()
    try:
        params = _compat.race_detecting_interpret_params(num_cores_or_threads=2)
        got = jax.block_until_ready(ragged_mosaic(x, op, jnp.asarray(sizes), cfg,
                                                  interpret=params))
        assert not _compat.tpu_races_found()
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    _check(got, numpy_reference(x, q, sizes))


def test_the_backend_runs_the_kernel_and_its_gradient():
    q = _q("int4", {})
    x = jax.random.normal(jax.random.PRNGKey(1), (12, K))
    g = jnp.asarray([4, 0, 6, 1])
    f = qkern.quaxify(lambda q, x: jax.lax.ragged_dot(x, q, g))
    with qkern.backend("mosaic_tpu", interpret=True):
        assert "ragged_qmatmul_mosaic" in str(jax.make_jaxpr(f)(q, x))
        y = f(q, x)
        dx = jax.grad(lambda x: jnp.sum(f(q, x) ** 2))(x)
    wd = qkern.dequantize(q)
    np.testing.assert_allclose(y, jax.lax.ragged_dot(x, wd, g, precision="highest"),
                               rtol=1e-5, atol=1e-4)
    want = jax.grad(lambda x: jnp.sum(jax.lax.ragged_dot(x, wd, g, precision="highest") ** 2))(x)
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-3)
    direct = ragged_qmatmul(x, stacked_operand(q), g, backend="mosaic_tpu", interpret=True)
    np.testing.assert_allclose(direct, y, rtol=1e-6, atol=1e-6)


def test_an_operand_mosaic_cannot_run_falls_back_to_xla():
    op = stacked_operand(_q("int8", dict(block_size=4)))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, K))
    g = jnp.asarray([2, 1, 0, 3])
    want = ragged_qmatmul(x, op, g, backend="xla")
    _backend._warned.clear()
    with qkern.backend("mosaic_tpu", interpret=True), pytest.warns(
            UserWarning, match=r"ragged_qmatmul runs on the xla backend here: block_size 4"):
        got = ragged_qmatmul(x, op, g)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"block_size 4 is not a multiple of 8"):
        ragged_qmatmul(x, op, g, backend="mosaic_tpu", interpret=True)


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=[f"{f}-{k}" for f, k in FORMATS])
def test_lowers_for_tpu(fmt, kw):
    """bfloat16 with one K step, float32 with two K steps and several row tiles."""
    op = stacked_operand(_q(fmt, kw, k=2048))
    g = jnp.asarray([1, 1, 0, 1], jnp.int32)
    steps = set()
    for m, dtype, cfg in [(3, jnp.bfloat16, MatmulConfig(block_k=4096)),
                          (40, jnp.float32, SMALL_TILES)]:
        x = jnp.ones((m, 2048), dtype)
        steps.add(plan_ragged(op, m, dtype, cfg).nk > 1)
        text = _compat.export(lambda x, op, g, cfg=cfg: ragged_mosaic(x, op, g, cfg), "tpu",
                              x, op, g).mlir_module()
        assert "tpu_custom_call" in text
    assert steps == {False, True}


def test_forward_and_gradient_through_quaxify_lower_for_tpu():
    q = _q("nf4", {})
    g = jnp.asarray([1, 1, 0, 1], jnp.int32)
    f = qkern.quaxify(lambda q, x, g: jnp.sum(jax.lax.ragged_dot(x, q, g) ** 2))
    with qkern.backend("mosaic_tpu"):
        text = _compat.export(jax.grad(f, argnums=1), "tpu", q, jnp.ones((5, K)), g
                              ).mlir_module()
    assert text.count("tpu_custom_call") >= 2       # grouped forward, 2-D transposed


def test_float16_runs_as_float32_and_w8a8_runs_the_xla_schedule():
    q = _q("int8", {})
    op, g, sizes = stacked_operand(q), jnp.asarray([2, 0, 3, 1]), [2, 0, 3, 1]
    x = jax.random.normal(jax.random.PRNGKey(4), (7, K))
    got = ragged_mosaic(x.astype(jnp.float16), op, g, interpret=True)
    assert got.dtype == jnp.float16
    _check(got, numpy_reference(np.asarray(x.astype(jnp.float16), np.float32), q, sizes),
           rtol=2e-3, atol=2e-2)
    want = ragged_qmatmul(x, op, g, w8a8=True, backend="xla")
    with qkern.backend("mosaic_tpu", interpret=True):
        w8 = ragged_qmatmul(x, op, g, w8a8=True, backend="mosaic_tpu", interpret=True)
    np.testing.assert_allclose(w8, want, rtol=1e-5, atol=1e-4)
