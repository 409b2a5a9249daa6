"""The Mosaic TPU backend of `qmatmul` (qkern/pallas/qmatmul/_mosaic.py), without a TPU:
the contract (contract_qmatmul.py) in interpret mode with the heuristic configs, plus what
is Mosaic's own:

* the planner: which kernel each M gets, the tiled kernel forced at small M, one-step and
  multi-step K tilings (per-stream scale blocks, the high stream's block offset, a masked
  ragged K tail, ragged N), the heuristic block_k moved to a legal tile;
* race detection with the TPU interpreter (two simulated cores), with a deliberately racy
  kernel as a positive control so the "no races" assertions can fail;
* lowering for TPU with jax.export (every format x every kernel);
* errors for configs that break Mosaic's tiling rules and for malformed inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import qkern
from qkern import _compat
from qkern.pallas._config import MatmulConfig
from qkern.pallas.qmatmul._mosaic import (
    plan_mosaic, qmatmul_mosaic, qmatmul_reference, qmatmul_t_mosaic,
    qmatmul_t_reference)
from qkern.pallas._operand import canonical_operand

from .contract_qmatmul import (DTYPES, FORMAT_IDS, FORMATS, SHAPES, QmatmulContract,
                               assert_matches, make_case, random_dy, ref, ref_t,
                               reference_matmul, reference_matmul_t)

_SMALL_M_TILED = [0, 3, 4, 6]       # int8 per-channel, int4 minmax, nf4, fp8_e4m3

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

# (m, k, n): one-step K with ragged N (whole scale strip), and multi-step K tiles
_LOWER_SHAPES = {"decode": [(3, 384, 200), (1, 4096, 384)],
                 "tiled": [(257, 320, 260), (64, 4096, 256)],
                 "transposed": [(3, 384, 200), (40, 4096, 384)]}


class TestMosaic(QmatmulContract):
    backend = "mosaic_tpu"
    interpret = True

    # -- the planner and Mosaic's own tilings -------------------------------------------

    @pytest.mark.parametrize("fi", range(len(FORMATS)), ids=FORMAT_IDS)
    def test_plan_takes_decode_up_to_16_rows_and_tiled_above(self, fi):
        """The kernel the contract's numerics ran for each shared shape (no kernel runs)."""
        fmt, opts = FORMATS[fi]
        for si, (m, k, n) in enumerate(SHAPES):
            _, _, op = make_case(fmt, opts, 1, k, n, jnp.float32)
            dtype = DTYPES[(fi + si) % len(DTYPES)]
            assert plan_mosaic(op, m, dtype).kernel == ("decode" if m <= 16 else "tiled")

    @pytest.mark.parametrize("fi", _SMALL_M_TILED, ids=[FORMAT_IDS[i] for i in _SMALL_M_TILED])
    def test_tiled_kernel_at_small_m_agrees_with_decode(self, fi):
        """The tiled kernel, forced at M=16 with 8-row M tiles (two M steps), matches both
        the reference and the decode kernel."""
        fmt, opts = FORMATS[fi]
        x, _, op = make_case(fmt, opts, 16, 384, 200, jnp.float32, seed=3)
        cfg = MatmulConfig(block_m=8, block_n=128, block_k=4096)
        tiled = qmatmul_mosaic(x, op, cfg, interpret=True, kernel="tiled")
        decode = qmatmul_mosaic(x, op, cfg, interpret=True, kernel="decode")
        assert plan_mosaic(op, 16, x.dtype, cfg, kernel="tiled").mp // 8 == 2
        assert_matches(tiled, ref(x, op))
        assert_matches(tiled, decode.astype(tiled.dtype))

    @pytest.mark.parametrize("fmt,opts,shape,dtype,cfg,expect", _MULTI,
                             ids=[f"{c[0]}-{'x'.join(map(str, c[2]))}" for c in _MULTI])
    def test_multistep_k_tiling(self, fmt, opts, shape, dtype, cfg, expect):
        m, k, n = shape
        x, _, op = make_case(fmt, opts, m, k, n, dtype, seed=5)
        plan = plan_mosaic(op, m, dtype, cfg)
        assert (plan.scale_mode, plan.nk) == expect
        assert_matches(qmatmul_mosaic(x, op, cfg, interpret=True), ref(x, op))
        dy = random_dy(m, n, dtype, seed=6)
        tplan = plan_mosaic(op, m, dtype, cfg, kernel="transposed")
        assert tplan.mask_n == (n % tplan.bn != 0)
        assert_matches(qmatmul_t_mosaic(dy, op, cfg, interpret=True), ref_t(dy, op))

    def test_default_config_is_adjusted_to_legal_tiles(self):
        """The heuristic block_k (512) gives 4 scale rows for int4's blocks of 128; the plan
        moves to 1024 (8 rows) instead of failing."""
        _, _, op = make_case("int4", {}, 1, 8192, 256, jnp.float32)
        plan = plan_mosaic(op, 1, jnp.float32)
        assert (plan.td, plan.scale_mode, plan.scale_rows, plan.hi_block) == (1024, "tiled", 8, 4)

    def test_module_references_match_shared_references(self):
        x, _, op = make_case("nf4", {}, 3, 384, 200, jnp.float32)
        dy = random_dy(3, 200, jnp.float32)
        np.testing.assert_array_equal(qmatmul_reference(x, op), reference_matmul(x, op))
        np.testing.assert_array_equal(qmatmul_t_reference(dy, op), reference_matmul_t(dy, op))

    # -- race detection (TPU interpreter, two simulated cores) --------------------------

    def test_race_detector_flags_a_racy_kernel(self, race_params):
        """Positive control: two cores writing one output block under "parallel"
        semantics."""
        def racy(x_ref, o_ref):
            o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

        f = pl.pallas_call(
            racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), grid=(2,),
            in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
            out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
            interpret=race_params)
        jax.block_until_ready(f(jnp.zeros((8, 128), jnp.float32)))
        assert _compat.tpu_races_found()

    @pytest.mark.parametrize("fmt,opts,shape,cfg,kernel", _RACE, ids=[r[0] for r in _RACE])
    def test_no_races(self, fmt, opts, shape, cfg, kernel, race_params):
        m, k, n = shape
        x, _, op = make_case(fmt, opts, m, k, n, jnp.float32, seed=9)
        y = jax.block_until_ready(qmatmul_mosaic(x, op, cfg, interpret=race_params,
                                                 kernel=kernel))
        assert not _compat.tpu_races_found()
        assert_matches(y, ref(x, op))
        dy = random_dy(m, n, jnp.float32)
        dx = jax.block_until_ready(qmatmul_t_mosaic(dy, op, cfg, interpret=race_params))
        assert not _compat.tpu_races_found()
        assert_matches(dx, ref_t(dy, op))

    # -- lowering for TPU ---------------------------------------------------------------

    @pytest.mark.parametrize("kernel", ["decode", "tiled", "transposed"])
    @pytest.mark.parametrize("fi", range(len(FORMATS)), ids=FORMAT_IDS)
    def test_lowers_for_tpu(self, fi, kernel):
        fmt, opts = FORMATS[fi]
        modes = set()
        for (m, k, n), dtype in zip(_LOWER_SHAPES[kernel], [jnp.bfloat16, jnp.float32]):
            x, _, op = make_case(fmt, opts, m, k, n, dtype)
            if kernel == "transposed":
                f = lambda d, op: qmatmul_t_mosaic(d, op)
                arg = random_dy(m, n, dtype)
            else:
                f = lambda x, op, kernel=kernel: qmatmul_mosaic(x, op, kernel=kernel)
                arg = x
            assert "tpu_custom_call" in _compat.export(f, "tpu", arg, op).mlir_module()
            plan = plan_mosaic(op, m, dtype, kernel=kernel)
            modes.add(plan.nk > 1)
        assert modes == {False, True}          # both one-step and multi-step K tilings lowered

    # -- what the Mosaic kernels refuse -------------------------------------------------

    @pytest.mark.parametrize("fmt,opts,k,cfg,match", [
        ("int4", {}, 2048, MatmulConfig(block_k=512), r"4 scale rows .* multiple of 8"),
        ("nf4", dict(block_size=96), 1152, MatmulConfig(block_k=256),
         r"not a multiple of the block size 96"),
        ("nf4", {}, 1536, MatmulConfig(block_k=512), r"does not divide the 12 blocks"),
        ("int8", {}, 1000, MatmulConfig(block_k=200), r"block_k=200 is not a multiple of 128"),
        ("nf4", {}, 2048, MatmulConfig(block_n=200), r"block_n=200 is not a multiple of 128"),
        ("int8", {}, 512, MatmulConfig(block_m=12), r"block_m=12 is not a multiple of 8"),
    ])
    def test_incompatible_config_raises(self, fmt, opts, k, cfg, match):
        op = _op(fmt, k, n=256 if "block_n" in match else 128, **opts)
        m = 64 if "block_m" in match else 1
        x = jnp.zeros((m, k), jnp.float32)
        with pytest.raises(ValueError, match=match):
            qmatmul_mosaic(x, op, cfg, interpret=True)
        with pytest.raises(ValueError, match=match):
            qmatmul_t_mosaic(jnp.zeros((m, op.n), jnp.float32), op, cfg, interpret=True)

    def test_mismatched_shapes_and_dtypes_raise(self):
        op = _op("nf4", 512)
        with pytest.raises(ValueError, match=r"x has K=500 .*K=512"):
            qmatmul_mosaic(jnp.zeros((2, 500)), op, interpret=True)
        with pytest.raises(ValueError, match=r"dy has N=255 .*N=256"):
            qmatmul_t_mosaic(jnp.zeros((2, 255)), op, interpret=True)
        with pytest.raises(ValueError, match=r"x must be 2-D"):
            qmatmul_mosaic(jnp.zeros((2, 3, 512)), op, interpret=True)
        with pytest.raises(ValueError, match=r"x dtype int32 is not supported"):
            qmatmul_mosaic(jnp.zeros((2, 512), jnp.int32), op, interpret=True)
        with pytest.raises(ValueError, match=r"decode kernel takes M <= 16; got M=32"):
            qmatmul_mosaic(jnp.zeros((32, 512)), op, interpret=True, kernel="decode")
        bad = op.__class__(op.data, op.scales[:-2], op.zeros, op.fmt, op.block_size, op.k)
        with pytest.raises(ValueError, match=r"data has 256 rows"):
            qmatmul_mosaic(jnp.zeros((2, bad.k)), bad, interpret=True)


def _op(fmt, k, n=256, **opts):
    w = jax.random.normal(jax.random.PRNGKey(0), (k, n), jnp.float32)
    return canonical_operand(qkern.quantize(w, fmt, **opts))
