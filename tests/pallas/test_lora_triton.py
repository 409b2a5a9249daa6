"""The fused QLoRA matmul on the Triton backend (qkern/pallas/lora_qmatmul/_triton.py):
the contract (contract_lora.py) in Pallas interpret mode, plus what is Triton's own.

No GPU here: numerics in interpret mode against `reference` (the fused kernel's y and xu,
both directions, for explicit configs), and lowering by exporting every kernel for `cuda`,
which runs the real Triton lowering (docs/kernels.md, "How the kernels are tested
here"). Interpret mode costs a few seconds per compiled case, so the explicit-config cases
are chosen to cover, between them: int8, int4 (symmetric and minmax zero points), nf4 and
fp8_e4m3; per-channel and sub-channel scales; float32 and bfloat16 x; M = 1, 3, 16 and 40
(decode and tiled kernels); K and N that are not multiples of the tiles; r = 4 and 12;
split-K (whose xu partials must be summed too) and the transposed kernel's split over N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qkern import _compat
from qkern.pallas._config import MatmulConfig
from qkern.pallas.lora_qmatmul._triton import lora_qmatmul_triton

from .contract_lora import SCALE, LoraContract, check_grads, check_lora, lora_case

# fmt, opts, (M, K, N), r, dtype, config
_CASES = [
    # decode, per-channel int8, one K split
    ("int8", {}, (1, 512, 256), 4, jnp.float32,
     MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=1)),
    # decode, zero points, blocks of 128 with block_k 64 (two steps per block), 3 splits
    ("int4", dict(calibration="minmax"), (3, 384, 200), 12, jnp.bfloat16,
     MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=3)),
    # decode at the 16-row limit, ragged K and N, two splits
    ("nf4", {}, (16, 1000, 136), 12, jnp.float32,
     MatmulConfig(block_m=16, block_n=64, block_k=32, split_k=2)),
    # tiled, per-channel fp8, two M tiles with a ragged last one; bfloat16 factors
    ("fp8_e4m3", {}, (40, 320, 260), 4, jnp.bfloat16,
     MatmulConfig(block_m=32, block_n=64, block_k=128, split_k=2)),
]
_IDS = [f"{c[0]}{'-minmax' if c[1] else ''}-{'x'.join(map(str, c[2]))}-r{c[3]}-"
        f"{jnp.dtype(c[4]).name}" for c in _CASES]

KERNELS = {
    # name: (M, config, transposed)
    "decode": (3, MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=1), False),
    "decode-splitk": (1, MatmulConfig(block_m=16, block_n=64, block_k=64, split_k=4), False),
    "tiled": (257, MatmulConfig(block_m=64, block_n=128, block_k=256), False),
    "transposed-split": (3, MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=2), True),
    "transposed-tiled": (257, MatmulConfig(block_m=64, block_n=64, block_k=64), True),
}
_LOWER_FORMATS = [("int8", {}), ("int4", dict(calibration="minmax")), ("nf4", {}),
                  ("fp8_e4m3", {})]


class TestTriton(LoraContract):
    backend = "triton"
    interpret = True

    # -- the fused kernel's (y, xu) for explicit configs ----------------------------------

    @pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
    @pytest.mark.parametrize("fmt,opts,shape,r,dtype,cfg", _CASES, ids=_IDS)
    def test_kernel_matches_reference(self, fmt, opts, shape, r, dtype, cfg, transposed):
        m, k, n = shape
        x, op, u, v = lora_case(fmt, opts, m, k, n, r, dtype, transposed)
        if fmt == "fp8_e4m3":
            u, v = u.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
        y, xu = lora_qmatmul_triton(x, op, u, v, SCALE, cfg, transposed=transposed,
                                    interpret=True)
        assert y.dtype == x.dtype and xu.dtype == jnp.float32
        check_lora(y, xu, x, op, u, v, transposed)

    def test_gradients_sub_channel_int8_transposed(self):
        """int8 in blocks of 64, bfloat16, the tiled transposed kernel and its backward."""
        check_grads(self.lora, "int8", dict(block_size=64), 20, 192, 72, 4, jnp.bfloat16,
                    True)

    def test_vmap(self):
        """vmap prepends a grid axis to the decode split-K kernel; the first-N-tile store
        of xu and the partial sums still hold (and the batched kernel still lowers)."""
        cfg = MatmulConfig(block_m=16, block_n=64, block_k=64, split_k=2)
        x, op, u, v = lora_case("int8", {}, 3, 256, 256, 4, jnp.float32)
        xs = jnp.stack([x, -2 * x])
        f = jax.vmap(lambda a: lora_qmatmul_triton(a, op, u, v, SCALE, cfg, interpret=True))
        ys, xus = jax.jit(f)(xs)
        for b in range(2):
            check_lora(ys[b], xus[b], xs[b], op, u, v, False)
        g = jax.vmap(lambda a: lora_qmatmul_triton(a, op, u, v, SCALE, cfg))
        assert "__gpu$xla.gpu.triton" in _export_cuda(g, xs)

    # -- lowering for the real target -----------------------------------------------------

    @pytest.mark.parametrize("kernel", list(KERNELS))
    @pytest.mark.parametrize("fmt,opts", _LOWER_FORMATS,
                             ids=["int8", "int4-minmax", "nf4", "fp8_e4m3"])
    def test_lowers_for_triton(self, fmt, opts, kernel):
        m, cfg, transposed = KERNELS[kernel]
        x, op, u, v = lora_case(fmt, opts, m, 1000, 136, 12, jnp.bfloat16, transposed)
        text = _export_cuda(lambda x, op, u, v: lora_qmatmul_triton(
            x, op, u, v, SCALE, cfg, transposed=transposed), x, op, u, v)
        assert text.count("__gpu$xla.gpu.triton") == 1       # one fused kernel, no fallback

    def test_default_configs_lower(self):
        for m in (1, 300):
            for transposed in (False, True):
                x, op, u, v = lora_case("nf4", {}, m, 2048, 256, 16, jnp.bfloat16, transposed)
                text = _export_cuda(lambda x, op, u, v: lora_qmatmul_triton(
                    x, op, u, v, SCALE, transposed=transposed), x, op, u, v)
                assert text.count("__gpu$xla.gpu.triton") == 1

    def test_fp8_from_bits_lowers(self, fp8_bits):
        """GPUs below sm_89 decode float8 arithmetically; that path lowers fused too."""
        x, op, u, v = lora_case("fp8_e4m3", {}, 3, 1000, 136, 4, jnp.bfloat16)
        cfg = KERNELS["decode"][1]
        assert "__gpu$xla.gpu.triton" in _export_cuda(
            lambda x, op, u, v: lora_qmatmul_triton(x, op, u, v, SCALE, cfg), x, op, u, v)

    # -- what the Triton kernels refuse ---------------------------------------------------

    def test_bad_factors_and_dtypes(self):
        x, op, u, v = lora_case("int4", {}, 3, 384, 200, 4, jnp.float32)
        call = lambda *a, **kw: lora_qmatmul_triton(*a, interpret=True, **kw)  # noqa: E731
        with pytest.raises(ValueError, match=r"factors u \(384, 4\) and v \(5, 200\)"):
            call(x, op, u, jnp.zeros((5, 200)), SCALE)
        with pytest.raises(ValueError, match=r"must be \[200, r\] and \[r, 384\]"):
            call(x[:, :200], op, u, v, SCALE, transposed=True)
        with pytest.raises(ValueError, match=r"factor u must be 2-D"):
            call(x, op, u[:, 0], v, SCALE)
        with pytest.raises(ValueError, match=r"factor v has dtype int32"):
            call(x, op, u, v.astype(jnp.int32), SCALE)
        with pytest.raises(ValueError, match=r"x dtype int32 is not supported"):
            call(x.astype(jnp.int32), op, u, v, SCALE)
        with pytest.raises(ValueError, match=r"x has K=383"):
            call(x[:, :383], op, u, v, SCALE)
        with pytest.raises(ValueError, match=r"block_k=48 .*block_size 128"):
            call(x, op, u, v, SCALE, MatmulConfig(block_k=48))


def _export_cuda(fn, *args) -> str:
    return _compat.export(fn, "cuda", *args).mlir_module()
