"""W8A8 on the Triton backend (qkern/pallas/w8a8/_triton.py) without a GPU: the contract
(contract_w8a8.py) in Pallas interpret mode, plus what is Triton's own: the planner's
choices (decode with and without split-K, the tiled kernel, overhanging K steps, ragged M
and N, blocks of 64) run with explicit configs, the gradient's kernels, the real Triton
lowering through jax.export for `cuda` (docs/kernels.md), the configs and scale layouts it
refuses, and its config sweep.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from qkern import _compat
from qkern.pallas._config import MatmulConfig
from qkern.pallas.w8a8 import w8a8_matmul
from qkern.pallas.w8a8._triton import plan_triton_w8a8, w8a8_triton

from .contract_qmatmul import assert_matches
from .contract_w8a8 import CASES, W8A8Contract, activation, int8_operand, ref

# (m, k, n), dtype, weight block (None: per channel), config, act_scale, expected plan
# (bk, sub, steps, split)
_CASES = {
    # decode, block_k a multiple of B (two scale blocks per step), steps past the rows
    "decode-block128": ((3, 384, 200), jnp.bfloat16, 128,
                        MatmulConfig(block_n=64, block_k=256, split_k=1), 0.02,
                        (256, 128, 2, 1)),
    # decode, block_k a divisor of B, uneven split over 3 programs, ragged N
    "decode-block64-split3": ((16, 1000, 136), jnp.float16, 64,
                              MatmulConfig(block_n=64, block_k=32, split_k=3), None,
                              (32, 32, 11, 3)),
    # tiled: ragged M, K and N, per channel (int32 accumulation over every K step)
    "tiled-per-channel": ((257, 320, 260), jnp.float32, None,
                          MatmulConfig(block_m=64, block_n=64, block_k=128), 0.05,
                          (128, 128, 3, 1)),
}

_LOWER = {
    "decode": (3, MatmulConfig(block_n=64, block_k=128, split_k=1)),
    "decode-splitk": (1, MatmulConfig(block_n=64, block_k=64, split_k=4)),
    "tiled": (257, MatmulConfig(block_m=64, block_n=128, block_k=128)),
    "default": (300, None),
}


class TestTriton(W8A8Contract):
    backend = "triton"
    interpret = True

    # -- the planner ----------------------------------------------------------------------

    def test_default_plans_of_the_contract_cases(self):
        """What the contract's numerics ran with config=None (no kernel runs): decode at
        M = 1 with block_k 256 over 512 rows and split_k 4 clamped to 2; the tiled default
        config (bk 64 < B = 128: sub-block steps)."""
        (m, k, n), _, block, _ = CASES["1x512x256-f32-per-channel-dynamic"]
        p = plan_triton_w8a8(int8_operand(k, n, block), m, None)
        assert (p.bk, p.sub, p.steps, p.split) == (256, 256, 1, 2)
        p = plan_triton_w8a8(int8_operand(640, 72, 128), 40, None)
        assert (p.bk, p.sub, p.steps, p.split) == (64, 64, 10, 1)

    @pytest.mark.parametrize("case", list(_CASES))
    def test_explicit_configs_match_reference(self, case):
        (m, k, n), dtype, block, cfg, act_scale, expect = _CASES[case]
        x, op = activation(m, k, dtype), int8_operand(k, n, block)
        p = plan_triton_w8a8(op, m, cfg)
        assert (p.bk, p.sub, p.steps, p.split) == expect
        s = None if act_scale is None else jnp.float32(act_scale)
        y = w8a8_triton(x, op, cfg, act_scale=s, interpret=True)
        assert y.dtype == dtype
        assert_matches(y, ref(x, op, s))

    def test_grad_runs_the_transposed_triton_kernel(self):
        """The kernels the contract's gradient test ran (its values are checked there)."""
        x, op = activation(3, 256, jnp.float32), int8_operand(256, 64, 128)
        f = lambda x: jnp.sum(w8a8_matmul(x, op, backend="triton", interpret=True))  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(f))(x))
        assert "qmatmul_t_triton" in jaxpr and "w8a8_triton" in jaxpr

    # -- lowering for the real target -----------------------------------------------------

    @pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
    @pytest.mark.parametrize("block", [None, 128], ids=["per-channel", "block128"])
    @pytest.mark.parametrize("kernel", list(_LOWER))
    def test_lowers_for_triton(self, kernel, block, static):
        m, cfg = _LOWER[kernel]
        x, op = activation(m, 1000, jnp.bfloat16), int8_operand(1000, 136, block)
        s = jnp.float32(0.1) if static else None
        text = _export_cuda(lambda x, op, s: w8a8_triton(x, op, cfg, act_scale=s), x, op, s)
        assert text.count("__gpu$xla.gpu.triton") == 1         # one kernel, no fallback path

    def test_vmapped_kernel_lowers(self):
        op = int8_operand(512, 256, 128)
        xs = jnp.stack([activation(3, 512, jnp.float16)] * 2)
        assert "__gpu$xla.gpu.triton" in _export_cuda(jax.vmap(lambda x: w8a8_triton(x, op)), xs)

    # -- what the Triton kernel refuses ---------------------------------------------------

    def test_config_rules(self):
        x, op = activation(3, 384, jnp.float32), int8_operand(384, 200, 128)
        with pytest.raises(ValueError, match=r"block_k=48 is incompatible .*block_size 128"):
            w8a8_triton(x, op, MatmulConfig(block_k=48), interpret=True)
        with pytest.raises(ValueError, match=r"block_n=100 must be a power of two"):
            w8a8_triton(x, op, MatmulConfig(block_n=100), interpret=True)
        op_pc = int8_operand(384, 200)
        with pytest.raises(ValueError, match=r"block_k=96 must be a power of two"):
            w8a8_triton(x, op_pc, MatmulConfig(block_k=96), interpret=True)
        with pytest.raises(TypeError, match=r"config must be a MatmulConfig"):
            w8a8_triton(x, op_pc, {"block_k": 64}, interpret=True)

    @pytest.mark.parametrize("block", [16, 48])
    def test_scale_blocks_an_int8_dot_cannot_take_are_refused(self, block):
        op = int8_operand(192, 64, block)
        with pytest.raises(ValueError, match=rf"block_size {block}: .*at least 32 rows"):
            w8a8_triton(activation(3, 192, jnp.float32), op, interpret=True)

    def test_bad_activations(self):
        op = int8_operand(384, 200)
        with pytest.raises(ValueError, match=r"x has K=383 .*K=384"):
            w8a8_triton(jnp.ones((3, 383)), op, interpret=True)
        with pytest.raises(ValueError, match=r"must be 2-D"):
            w8a8_triton(jnp.ones((1, 3, 384)), op, interpret=True)
        with pytest.raises(ValueError, match=r"int32 is not supported"):
            w8a8_triton(jnp.ones((3, 384), jnp.int32), op, interpret=True)
        with pytest.raises(ValueError, match=r"act_scale must be a scalar"):
            w8a8_triton(jnp.ones((3, 384)), op, act_scale=jnp.ones(3), interpret=True)
        bad = dataclasses.replace(op, data=op.data[:300])
        with pytest.raises(ValueError, match=r"shapes disagree"):
            w8a8_triton(jnp.ones((3, 384)), bad, interpret=True)

    def test_config_sweep_runs(self, capsys):
        """The config sweep prints a header and one row per (M, config), errors near zero."""
        import qkern._bench.sweep_triton_w8a8 as tw
        tw.main(["--k", "128", "--n", "32", "--m", "1", "--configs", "1"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:2] == ["M", "config"] and len(out) == 2
        assert float(out[1].split()[-3]) < 1e-5


def _export_cuda(fn, *args) -> str:
    return _compat.export(fn, "cuda", *args).mlir_module()
