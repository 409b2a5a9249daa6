"""W8A8 on the Mosaic TPU backend (qkern/pallas/w8a8/_mosaic.py) without a TPU: the
contract (contract_w8a8.py) in interpret mode, plus what is Mosaic's own: the planner's
choices (decode and tiled kernels, per-channel rows, whole scale strips and [8, bn] scale
tiles, multi-step K, a masked overhanging K tile), the TPU interpreter's race detector, the
Pallas-to-Mosaic lowering through jax.export for `tpu`, the tiling rules and its config
sweep.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from qkern import _compat
from qkern.pallas._config import MatmulConfig
from qkern.pallas.w8a8._mosaic import plan_mosaic_w8a8, w8a8_mosaic

from .contract_qmatmul import assert_matches
from .contract_w8a8 import CASES, W8A8Contract, activation, int8_operand, ref

# What the contract's cases plan with config=None: expected (kernel, scale_mode, K steps,
# N tiles)
_DEFAULT_PLANS = {
    # decode, one K step, per channel
    "1x512x256-f32-per-channel-dynamic": ("decode", "row", 1, 1),
    # decode, per-block scales, one K step: the whole [nb, N] scale strip
    "16x1000x136-f16-block128-dynamic": ("decode", "whole", 1, 1),
    # tiled, ragged M; one K step of 320 (not a multiple of 128: full-dim blocks)
    "257x320x260-f32-per-channel-static": ("tiled", "row", 1, 2),
}

# Explicit configs: (m, k, n), dtype, weight block (None: per channel), config, act_scale,
# expected (kernel, scale_mode, K steps, N tiles)
_CASES = {
    # decode, three K steps into the int32 accumulator, ragged N (partial last N tile)
    "decode-row-multistep": ((3, 384, 200), jnp.bfloat16, None,
                             MatmulConfig(block_n=128, block_k=128), 0.02,
                             ("decode", "row", 3, 2)),
    # tiled, per-block scales in [8, bn] blocks, the last K tile overhangs the weight
    # (its scale rows masked), two M tiles
    "tiled-blocks-masked": ((40, 1100, 260), jnp.bfloat16, 128,
                            MatmulConfig(block_m=32, block_n=128, block_k=1024), None,
                            ("tiled", "tiled", 2, 3)),
}

_LOWER = [
    # (m, k, n), dtype, block, config, scale_mode, nk
    ((3, 384, 200), jnp.bfloat16, None, None, "row", 1),
    ((1, 4096, 384), jnp.float32, None, None, "row", 8),
    ((16, 1000, 136), jnp.float16, 128, None, "whole", 1),
    ((1, 4096, 512), jnp.bfloat16, 128, None, "tiled", 4),
    ((257, 320, 260), jnp.float32, None, None, "row", 1),
    ((300, 2200, 256), jnp.bfloat16, 128, MatmulConfig(block_m=64, block_n=128, block_k=1024),
     "tiled", 3),
    ((64, 4096, 256), jnp.float32, 256, None, "tiled", 2),
]


class TestMosaic(W8A8Contract):
    backend = "mosaic_tpu"
    interpret = True

    # -- the planner ----------------------------------------------------------------------

    @pytest.mark.parametrize("case", list(_DEFAULT_PLANS))
    def test_default_plans_of_the_contract_cases(self, case):
        """The kernel and tiling the contract's numerics ran (no kernel runs here)."""
        (m, k, n), dtype, block, _ = CASES[case]
        p = plan_mosaic_w8a8(int8_operand(k, n, block), m, dtype, None)
        assert (p.kernel, p.scale_mode, p.nk, p.nn) == _DEFAULT_PLANS[case]
        assert p.bm % 32 == 0

    @pytest.mark.parametrize("case", list(_CASES))
    def test_explicit_configs_match_reference(self, case):
        (m, k, n), dtype, block, cfg, act_scale, expect = _CASES[case]
        x, op = activation(m, k, dtype), int8_operand(k, n, block)
        p = plan_mosaic_w8a8(op, m, dtype, cfg)
        assert (p.kernel, p.scale_mode, p.nk, p.nn) == expect
        assert p.bm % 32 == 0
        s = None if act_scale is None else jnp.float32(act_scale)
        y = w8a8_mosaic(x, op, cfg, act_scale=s, interpret=True)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_matches(y, ref(x, op, s))

    # -- race detection (TPU interpreter, two simulated cores) ----------------------------

    def test_no_races(self, race_params):
        """Grid (2 M tiles, 2 N tiles, 2 K steps): accumulation across K, parallel M and N.
        The TPU interpreter fills out-of-bounds block rows with 0xFF bytes (NaN as
        float32), so the overhanging last K tile also pins the masking of its scale rows."""
        op = int8_operand(1100, 256, 128)
        x = activation(40, 1100, jnp.float32)
        cfg = MatmulConfig(block_m=32, block_n=128, block_k=1024)
        p = plan_mosaic_w8a8(op, 40, x.dtype, cfg)
        assert (p.mp // p.bm, p.nn, p.nk, p.mask_scales) == (2, 2, 2, True)
        y = jax.block_until_ready(w8a8_mosaic(x, op, cfg, interpret=race_params))
        assert not _compat.tpu_races_found()
        assert_matches(y, ref(x, op, None))

    # -- lowering for TPU -----------------------------------------------------------------

    @pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
    @pytest.mark.parametrize("i", range(len(_LOWER)),
                             ids=[f"{'x'.join(map(str, c[0]))}-{c[4]}" for c in _LOWER])
    def test_lowers_for_tpu(self, i, static):
        (m, k, n), dtype, block, cfg, mode, nk = _LOWER[i]
        x, op = activation(m, k, dtype), int8_operand(k, n, block)
        p = plan_mosaic_w8a8(op, m, dtype, cfg)
        assert (p.scale_mode, p.nk) == (mode, nk)
        s = jnp.float32(0.1) if static else None
        text = _tpu_mlir(lambda x, op, s: w8a8_mosaic(x, op, cfg, act_scale=s), x, op, s)
        assert text.count("tpu_custom_call") == 1

    def test_vmapped_kernel_lowers(self):
        op = int8_operand(512, 256)
        xs = jnp.stack([activation(3, 512, jnp.bfloat16)] * 2)
        assert "tpu_custom_call" in _tpu_mlir(jax.vmap(lambda x: w8a8_mosaic(x, op)), xs)

    # -- what the Mosaic kernel refuses ---------------------------------------------------

    @pytest.mark.parametrize("k,block,cfg,match", [
        (2048, 128, MatmulConfig(block_k=512), r"4 scale rows .* multiple of 8"),
        (2048, 128, MatmulConfig(block_k=1152), r"9 scale rows"),
        (4096, 256, MatmulConfig(block_k=1152), r"block_k=1152 .*multiple of the block size 256"),
        (1000, None, MatmulConfig(block_k=200), r"block_k=200 is not a multiple of 128"),
        (1024, 64, None, r"block_size 64: .*multiple of 128"),
        (1024, None, MatmulConfig(block_n=200), r"block_n=200 is not a multiple of 128"),
        (512, None, MatmulConfig(block_m=12), r"block_m=12 is not a multiple of 8"),
    ])
    def test_tiling_rules(self, k, block, cfg, match):
        op = int8_operand(k, 256, block)
        m = 64 if "block_m" in match else 1
        with pytest.raises(ValueError, match=match):
            w8a8_mosaic(jnp.zeros((m, k), jnp.float32), op, cfg, interpret=True)

    def test_bad_activations(self):
        op = int8_operand(512, 256)
        with pytest.raises(ValueError, match=r"x has K=500 .*K=512"):
            w8a8_mosaic(jnp.zeros((2, 500)), op, interpret=True)
        with pytest.raises(ValueError, match=r"x must be 2-D"):
            w8a8_mosaic(jnp.zeros((2, 3, 512)), op, interpret=True)
        with pytest.raises(ValueError, match=r"x dtype int32 is not supported"):
            w8a8_mosaic(jnp.zeros((2, 512), jnp.int32), op, interpret=True)
        with pytest.raises(ValueError, match=r"act_scale must be a scalar"):
            w8a8_mosaic(jnp.zeros((2, 512)), op, act_scale=jnp.ones((1, 1)), interpret=True)
        bad = dataclasses.replace(op, scales=op.scales[:, :100])
        with pytest.raises(ValueError, match=r"shapes disagree"):
            w8a8_mosaic(jnp.zeros((2, 512)), bad, interpret=True)

    def test_config_sweep_runs(self, capsys):
        import qkern._bench.sweep_mosaic_w8a8 as mw
        mw.main(["--k", "256", "--n", "128", "--m", "1"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:2] == ["M", "config"] and len(out) == 3
        assert all(line.split()[-1] == "yes" for line in out[1:])
        assert all(float(line.split()[-3]) < 1e-5 for line in out[1:])


def _tpu_mlir(f, *args) -> str:
    return _compat.export(f, "tpu", *args).mlir_module()
