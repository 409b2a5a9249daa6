"""Mosaic TPU quantised-matmul kernels, tested without a TPU.

* numerics in interpret mode against cases.reference_matmul / reference_matmul_t: every
  format, dtype and shape of cases.py appears (a covering subset of the cross product:
  interpret mode is slow), for the decode, tiled and transposed kernels, one-step and
  multi-step K tilings, ragged K and N, under jit and vmap;
* race detection with the TPU interpreter (two simulated cores), with a deliberately racy
  kernel as a positive control so the "no races" assertions can fail;
* lowering for TPU with jax.export (every format x every kernel);
* errors for configs that break Mosaic's tiling rules and for mismatched shapes.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import qkern
from qkern import _compat
from qkern.pallas._config import MatmulConfig
from qkern.pallas._mosaic_qmatmul import (
    plan_mosaic, qmatmul_mosaic, qmatmul_reference, qmatmul_t_mosaic,
    qmatmul_t_reference)
from qkern.pallas._operand import canonical_operand

from .cases import (DTYPES, FORMAT_IDS, FORMATS, SHAPES, assert_matches, make_case,
                    reference_matmul, reference_matmul_t)

# jitted once per shape: cheaper than the references' eager op-by-op dispatch
_ref = jax.jit(reference_matmul)
_ref_t = jax.jit(reference_matmul_t)


def _dy(m, n, dtype, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (m, n), jnp.float32).astype(dtype)


# A covering subset of FORMATS x SHAPES x DTYPES: every (format, shape) pair, with the
# dtype rotating so that every format meets every dtype and every shape meets every dtype.
_CROSS = [(fi, si, (fi + si) % len(DTYPES))
          for fi, si in itertools.product(range(len(FORMATS)), range(len(SHAPES)))]
_CROSS_IDS = [f"{FORMAT_IDS[fi]}-{'x'.join(map(str, SHAPES[si]))}-"
              f"{jnp.dtype(DTYPES[di]).name}" for fi, si, di in _CROSS]


# The transposed kernel gets half of it: every format on two shapes, every shape on four
# formats, every dtype on every shape.
_CROSS_T = [c for c in _CROSS if (c[0] + c[1]) % 2 == 0]
_CROSS_T_IDS = [i for c, i in zip(_CROSS, _CROSS_IDS) if (c[0] + c[1]) % 2 == 0]


def test_cross_products_cover_formats_shapes_and_dtypes():
    for cross in (_CROSS, _CROSS_T):
        assert {fi for fi, _, _ in cross} == set(range(len(FORMATS)))
        assert {si for _, si, _ in cross} == set(range(len(SHAPES)))
        assert {di for _, _, di in cross} == set(range(len(DTYPES)))
    # the forward cross meets every (format, dtype) and every (shape, dtype) pair
    assert len({(fi, di) for fi, _, di in _CROSS}) == len(FORMATS) * len(DTYPES)
    assert len({(si, di) for _, si, di in _CROSS}) == len(SHAPES) * len(DTYPES)


# ---------------------------------------------------------------------------------------
# Numerics (interpret mode)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fi,si,di", _CROSS, ids=_CROSS_IDS)
def test_forward_matches_reference(fi, si, di):
    (fmt, opts), (m, k, n), dtype = FORMATS[fi], SHAPES[si], DTYPES[di]
    x, _, op = make_case(fmt, opts, m, k, n, dtype)
    y = qmatmul_mosaic(x, op, interpret=True)
    assert plan_mosaic(op, m, dtype).kernel == ("decode" if m <= 16 else "tiled")
    assert_matches(y, _ref(x, op))


@pytest.mark.parametrize("fi,si,di", _CROSS_T, ids=_CROSS_T_IDS)
def test_transposed_matches_reference(fi, si, di):
    (fmt, opts), (m, k, n), dtype = FORMATS[fi], SHAPES[si], DTYPES[di]
    _, _, op = make_case(fmt, opts, m, k, n, dtype)
    dy = _dy(m, n, dtype)
    dx = qmatmul_t_mosaic(dy, op, interpret=True)
    assert dx.shape == (m, k)
    assert_matches(dx, _ref_t(dy, op))


_SMALL_M_TILED = [0, 3, 4, 6]       # int8 per-channel, int4 minmax, nf4, fp8_e4m3


@pytest.mark.parametrize("fi", _SMALL_M_TILED, ids=[FORMAT_IDS[i] for i in _SMALL_M_TILED])
def test_tiled_kernel_at_small_m_agrees_with_decode(fi):
    """The tiled kernel, forced at M=16 with 8-row M tiles (two M steps), matches both the
    reference and the decode kernel."""
    fmt, opts = FORMATS[fi]
    x, _, op = make_case(fmt, opts, 16, 384, 200, jnp.float32, seed=3)
    cfg = MatmulConfig(block_m=8, block_n=128, block_k=4096)
    tiled = qmatmul_mosaic(x, op, cfg, interpret=True, kernel="tiled")
    decode = qmatmul_mosaic(x, op, cfg, interpret=True, kernel="decode")
    assert plan_mosaic(op, 16, x.dtype, cfg, kernel="tiled").mp // 8 == 2
    assert_matches(tiled, _ref(x, op))
    assert_matches(tiled, decode.astype(tiled.dtype))


# Multi-step K tilings: per-stream scale blocks ("tiled"), the high stream's block offset,
# a ragged per-channel K tail (masked), ragged N (partial edge blocks, masked when N is
# contracted), several M tiles.
_MULTI = [
    # fmt, opts, (m, k, n), dtype, config, expected (scale_mode, nk)
    ("nf4", {}, (3, 2048, 260), jnp.float32, MatmulConfig(block_n=128, block_k=512), ("tiled", 2)),
    ("fp4", {}, (24, 2048, 136), jnp.bfloat16, MatmulConfig(block_m=16, block_k=512),
     ("tiled", 2)),
    ("int4", dict(calibration="minmax"), (5, 4096, 128), jnp.float16,
     MatmulConfig(block_n=128, block_k=1024), ("tiled", 2)),
    ("int8", {}, (40, 1000, 260), jnp.float32, MatmulConfig(block_m=16, block_n=128, block_k=256),
     ("row", 4)),
    ("fp8_e4m3", {}, (7, 1000, 300), jnp.float16, MatmulConfig(block_n=128, block_k=384),
     ("row", 3)),
    ("fp8_e5m2", dict(block_size=128), (1, 2048, 128), jnp.float32, MatmulConfig(block_k=1024),
     ("tiled", 2)),
]


@pytest.mark.parametrize("fmt,opts,shape,dtype,cfg,expect", _MULTI,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[2]))}" for c in _MULTI])
def test_multistep_k_tiling(fmt, opts, shape, dtype, cfg, expect):
    m, k, n = shape
    x, _, op = make_case(fmt, opts, m, k, n, dtype, seed=5)
    plan = plan_mosaic(op, m, dtype, cfg)
    assert (plan.scale_mode, plan.nk) == expect
    assert_matches(qmatmul_mosaic(x, op, cfg, interpret=True), _ref(x, op))
    dy = _dy(m, n, dtype, seed=6)
    tplan = plan_mosaic(op, m, dtype, cfg, kernel="transposed")
    assert tplan.mask_n == (n % tplan.bn != 0)
    assert_matches(qmatmul_t_mosaic(dy, op, cfg, interpret=True), _ref_t(dy, op))


def test_default_config_is_adjusted_to_legal_tiles():
    """The heuristic block_k (512) gives 4 scale rows for int4's blocks of 128; the plan
    moves to 1024 (8 rows) instead of failing."""
    _, _, op = make_case("int4", {}, 1, 8192, 256, jnp.float32)
    plan = plan_mosaic(op, 1, jnp.float32)
    assert (plan.td, plan.scale_mode, plan.scale_rows, plan.hi_block) == (1024, "tiled", 8, 4)


_JV = [("nf4", {}, 3, jnp.bfloat16), ("int4", dict(calibration="minmax"), 20, jnp.float32),
       ("fp8_e5m2", dict(block_size=128), 3, jnp.float16)]


@pytest.mark.parametrize("fmt,opts,m,dtype", _JV, ids=[f"{f[0]}-m{f[2]}" for f in _JV])
def test_jit_and_vmap(fmt, opts, m, dtype):
    """jit(vmap(kernel)) over a batch of x (and of dy) matches the reference per element,
    through pallas_call's batching rule (M=3: decode kernel, M=20: tiled kernel)."""
    _, _, op = make_case(fmt, opts, m, 640, 192, dtype)
    xs = jax.random.normal(jax.random.PRNGKey(7), (2, m, 640)).astype(dtype)
    dys = jax.random.normal(jax.random.PRNGKey(8), (2, m, 192)).astype(dtype)
    fwd = jax.jit(jax.vmap(lambda x, op: qmatmul_mosaic(x, op, interpret=True),
                           in_axes=(0, None)))
    bwd = jax.jit(jax.vmap(lambda d, op: qmatmul_t_mosaic(d, op, interpret=True),
                           in_axes=(0, None)))
    ys, dxs = fwd(xs, op), bwd(dys, op)
    assert ys.shape == (2, m, 192) and dxs.shape == (2, m, 640)
    for b in range(2):
        assert_matches(ys[b], _ref(xs[b], op))
        assert_matches(dxs[b], _ref_t(dys[b], op))


def test_module_references_match_shared_references():
    x, _, op = make_case("nf4", {}, 3, 384, 200, jnp.float32)
    dy = _dy(3, 200, jnp.float32)
    np.testing.assert_array_equal(qmatmul_reference(x, op), reference_matmul(x, op))
    np.testing.assert_array_equal(qmatmul_t_reference(dy, op), reference_matmul_t(dy, op))


# ---------------------------------------------------------------------------------------
# Race detection (TPU interpreter, two simulated cores)
# ---------------------------------------------------------------------------------------

def _races_found() -> bool:
    return _compat.tpu_races_found()


def test_race_detector_flags_a_racy_kernel(race_params):
    """Positive control: two cores writing one output block under "parallel" semantics."""
    def racy(x_ref, o_ref):
        o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

    f = pl.pallas_call(
        racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=race_params)
    jax.block_until_ready(f(jnp.zeros((8, 128), jnp.float32)))
    assert _races_found()


# Small grids (2-4 steps per parallel axis) with multi-step K accumulation, two streams,
# zero points, a masked K tail and ragged N. The fp8 case also pins the K-tail mask: the
# TPU interpreter fills out-of-bounds block rows with 0xFF bytes, a float8 NaN, so an
# unmasked tail would poison the result (interpret=True pads with finite values).
_RACE = [
    ("nf4", {}, (3, 2048, 256), MatmulConfig(block_n=128, block_k=512), "decode"),
    ("int4", dict(calibration="minmax"), (16, 1024, 256),
     MatmulConfig(block_m=8, block_n=128, block_k=4096), "tiled"),
    ("fp8_e4m3", {}, (5, 1000, 200), MatmulConfig(block_n=128, block_k=256), "decode"),
]


@pytest.mark.parametrize("fmt,opts,shape,cfg,kernel", _RACE, ids=[r[0] for r in _RACE])
def test_no_races(fmt, opts, shape, cfg, kernel, race_params):
    m, k, n = shape
    x, _, op = make_case(fmt, opts, m, k, n, jnp.float32, seed=9)
    y = jax.block_until_ready(qmatmul_mosaic(x, op, cfg, interpret=race_params,
                                             kernel=kernel))
    assert not _races_found()
    assert_matches(y, _ref(x, op))
    dy = _dy(m, n, jnp.float32)
    dx = jax.block_until_ready(qmatmul_t_mosaic(dy, op, cfg, interpret=race_params))
    assert not _races_found()
    assert_matches(dx, _ref_t(dy, op))


# ---------------------------------------------------------------------------------------
# Lowering for TPU
# ---------------------------------------------------------------------------------------

def _tpu_mlir(f, *args) -> str:
    return _compat.export(f, "tpu", *args).mlir_module()


# (m, k, n): one-step K with ragged N (whole scale strip), and multi-step K tiles
_LOWER_SHAPES = {"decode": [(3, 384, 200), (1, 4096, 384)],
                 "tiled": [(257, 320, 260), (64, 4096, 256)],
                 "transposed": [(3, 384, 200), (40, 4096, 384)]}


@pytest.mark.parametrize("kernel", ["decode", "tiled", "transposed"])
@pytest.mark.parametrize("fi", range(len(FORMATS)), ids=FORMAT_IDS)
def test_lowers_for_tpu(fi, kernel):
    fmt, opts = FORMATS[fi]
    modes = set()
    for (m, k, n), dtype in zip(_LOWER_SHAPES[kernel], [jnp.bfloat16, jnp.float32]):
        x, _, op = make_case(fmt, opts, m, k, n, dtype)
        if kernel == "transposed":
            f = lambda d, op: qmatmul_t_mosaic(d, op)
            arg = _dy(m, n, dtype)
        else:
            f = lambda x, op, kernel=kernel: qmatmul_mosaic(x, op, kernel=kernel)
            arg = x
        assert "tpu_custom_call" in _tpu_mlir(f, arg, op)
        plan = plan_mosaic(op, m, dtype, kernel=kernel)
        modes.add(plan.nk > 1)
    assert modes == {False, True}          # both one-step and multi-step K tilings lowered


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def _op(fmt, k, n=256, **opts):
    w = jax.random.normal(jax.random.PRNGKey(0), (k, n), jnp.float32)
    return canonical_operand(qkern.quantize(w, fmt, **opts))


@pytest.mark.parametrize("fmt,opts,k,cfg,match", [
    ("int4", {}, 2048, MatmulConfig(block_k=512), r"4 scale rows .* multiple of 8"),
    ("nf4", dict(block_size=96), 1152, MatmulConfig(block_k=256),
     r"not a multiple of the block size 96"),
    ("nf4", {}, 1536, MatmulConfig(block_k=512), r"does not divide the 12 blocks"),
    ("int8", {}, 1000, MatmulConfig(block_k=200), r"block_k=200 is not a multiple of 128"),
    ("nf4", {}, 2048, MatmulConfig(block_n=200), r"block_n=200 is not a multiple of 128"),
    ("int8", {}, 512, MatmulConfig(block_m=12), r"block_m=12 is not a multiple of 8"),
])
def test_incompatible_config_raises(fmt, opts, k, cfg, match):
    op = _op(fmt, k, n=256 if "block_n" in match else 128, **opts)
    m = 64 if "block_m" in match else 1
    x = jnp.zeros((m, k), jnp.float32)
    with pytest.raises(ValueError, match=match):
        qmatmul_mosaic(x, op, cfg, interpret=True)
    with pytest.raises(ValueError, match=match):
        qmatmul_t_mosaic(jnp.zeros((m, op.n), jnp.float32), op, cfg, interpret=True)


def test_mismatched_shapes_and_dtypes_raise():
    op = _op("nf4", 512)
    with pytest.raises(ValueError, match=r"x has 500 columns .* K=512"):
        qmatmul_mosaic(jnp.zeros((2, 500)), op, interpret=True)
    with pytest.raises(ValueError, match=r"dy has 255 columns .* N=256"):
        qmatmul_t_mosaic(jnp.zeros((2, 255)), op, interpret=True)
    with pytest.raises(ValueError, match=r"x must be a 2-D"):
        qmatmul_mosaic(jnp.zeros((2, 3, 512)), op, interpret=True)
    with pytest.raises(ValueError, match=r"activation dtype int32"):
        qmatmul_mosaic(jnp.zeros((2, 512), jnp.int32), op, interpret=True)
    with pytest.raises(ValueError, match=r"decode kernel takes M <= 16; got M=32"):
        qmatmul_mosaic(jnp.zeros((32, 512)), op, interpret=True, kernel="decode")
    bad = op.__class__(op.data, op.scales[:-2], op.zeros, op.fmt, op.block_size, op.k)
    with pytest.raises(ValueError, match=r"data has 256 rows"):
        qmatmul_mosaic(jnp.zeros((2, bad.k)), bad, interpret=True)
