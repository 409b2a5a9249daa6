"""The Triton W8A8 kernel (qkern/pallas/_triton_w8a8.py) without a GPU: numerics in
Pallas interpret mode against w8a8_reference, and the real Triton lowering through
jax.export for `cuda` (see DESIGN.md). Interpret mode is slow, so a handful of cases
cover the shapes of cases.SHAPES, every dtype, every scale layout, decode with and without
split-K, the tiled kernel, overhanging K steps and ragged M and N.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from qkern import _compat
from qkern.pallas._config import MatmulConfig
from qkern.pallas._triton_w8a8 import plan_triton_w8a8, w8a8_triton
from qkern.pallas._xla_w8a8 import w8a8_reference

from .cases import assert_matches
from .test_w8a8_cases import activation, int8_operand

_ref = jax.jit(w8a8_reference)

# (m, k, n), dtype, weight block (None: per channel), config, act_scale, expected plan
# (bk, sub, steps, split)
_CASES = {
    # decode, default config: block_k 256 over 512 rows, split_k 4 clamped to 2
    "decode-default-splitk": ((1, 512, 256), jnp.float32, None, None, None, (256, 256, 1, 2)),
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


@pytest.mark.parametrize("case", list(_CASES))
def test_matches_reference(case):
    (m, k, n), dtype, block, cfg, act_scale, expect = _CASES[case]
    x, op = activation(m, k, dtype), int8_operand(k, n, block)
    p = plan_triton_w8a8(op, m, cfg)
    assert (p.bk, p.sub, p.steps, p.split) == expect
    s = None if act_scale is None else jnp.float32(act_scale)
    y = w8a8_triton(x, op, cfg, act_scale=s, interpret=True)
    assert y.dtype == dtype
    assert_matches(y, _ref(x, op, s))


def test_tiled_default_config_under_jit_and_vmap():
    """Tiled default config (bk 64 < B = 128: sub-block steps), a batch of x through
    pallas_call's batching rule, and a traced act_scale."""
    op = int8_operand(640, 72, 128)
    xs = jnp.stack([activation(40, 640, jnp.bfloat16, seed) for seed in (1, 2)])
    f = jax.jit(jax.vmap(lambda x, s: w8a8_triton(x, op, act_scale=s, interpret=True)))
    scales = jnp.array([0.02, 0.03], jnp.float32)
    ys = f(xs, scales)
    for b in range(2):
        assert_matches(ys[b], _ref(xs[b], op, scales[b]))


# ---------------------------------------------------------------------------- lowering


def _export_cuda(fn, *args) -> str:
    return _compat.export(fn, "cuda", *args).mlir_module()


_LOWER = {
    "decode": (3, MatmulConfig(block_n=64, block_k=128, split_k=1)),
    "decode-splitk": (1, MatmulConfig(block_n=64, block_k=64, split_k=4)),
    "tiled": (257, MatmulConfig(block_m=64, block_n=128, block_k=128)),
    "default": (300, None),
}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("block", [None, 128], ids=["per-channel", "block128"])
@pytest.mark.parametrize("kernel", list(_LOWER))
def test_lowers_for_triton(kernel, block, static):
    m, cfg = _LOWER[kernel]
    x, op = activation(m, 1000, jnp.bfloat16), int8_operand(1000, 136, block)
    s = jnp.float32(0.1) if static else None
    text = _export_cuda(lambda x, op, s: w8a8_triton(x, op, cfg, act_scale=s), x, op, s)
    assert text.count("__gpu$xla.gpu.triton") == 1         # one kernel, no fallback path


def test_vmapped_kernel_lowers():
    op = int8_operand(512, 256, 128)
    xs = jnp.stack([activation(3, 512, jnp.float16)] * 2)
    assert "__gpu$xla.gpu.triton" in _export_cuda(jax.vmap(lambda x: w8a8_triton(x, op)), xs)


# ---------------------------------------------------------------------------- bad input


def test_config_rules():
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
def test_scale_blocks_an_int8_dot_cannot_take_are_refused(block):
    op = int8_operand(192, 64, block)
    with pytest.raises(ValueError, match=rf"block_size {block}: .*at least 32 rows"):
        w8a8_triton(activation(3, 192, jnp.float32), op, interpret=True)


def test_bad_activations():
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


def test_main_runs(capsys):
    """The config sweep prints a header and one row per (M, config), errors near zero."""
    import qkern._bench.sweep_triton_w8a8 as tw
    tw.main(["--k", "128", "--n", "32", "--m", "1", "--configs", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["M", "config"] and len(out) == 2
    assert float(out[1].split()[-3]) < 1e-5
