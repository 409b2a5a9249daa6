"""The Triton backend of `qmatmul` (qkern/pallas/qmatmul/_triton.py): the contract
(contract_qmatmul.py) in Pallas interpret mode with small configs chosen per M, plus what
is Triton's own.

No GPU here, so two halves (docs/kernels.md, "How the kernels are tested here"):
numerics run the kernels in interpret mode against the shared references, and lowering
exports every kernel for `cuda`, which runs the real Triton lowering. Triton's own: split-K
and the transposed kernel's split over N, the planner's config fitting, the float8 bit
decoder of GPUs below sm_89, ragged random shapes, lowering, the configs it refuses and its
config sweep.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest

from qkern import _compat
from qkern.pallas.qmatmul import _triton as tq
from qkern.pallas._config import MatmulConfig
from qkern.pallas.qmatmul._triton import qmatmul_t_triton, qmatmul_triton

from .contract_qmatmul import (FORMAT_IDS, FORMATS, MX_FORMATS, QmatmulContract,
                               assert_matches, make_case, random_dy, reference_matmul,
                               reference_matmul_t)

# One small config per shared M, chosen so the block_k / block size relations vary:
# block_k a multiple of B (several scale blocks per K step), equal, and a divisor; split
# over 1, 2 and 3 programs (3 does not divide the K steps evenly); N tiles that overhang.
CONFIGS = {
    1: MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=1),
    3: MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=3),
    16: MatmulConfig(block_m=16, block_n=64, block_k=32, split_k=2),
    257: MatmulConfig(block_m=64, block_n=64, block_k=128, split_k=2),
}


class TestTriton(QmatmulContract):
    backend = "triton"
    interpret = True

    def config(self, m):
        """The CONFIGS entry of the nearest shared M at or above m."""
        return CONFIGS[min((c for c in CONFIGS if c >= m), default=257)]

    # -- numerics of Triton's own paths --------------------------------------------------

    @pytest.mark.parametrize("m,split_k", [(1, 2), (1, 5), (40, 3)])
    def test_split_k_does_not_change_the_result(self, split_k, m):
        """Decode split-K (forward, M <= 16) and the transposed kernel's split over N."""
        x, _, op = make_case("int4", dict(calibration="minmax"), m, 1000, 136, jnp.float32)
        cfg = MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=split_k)
        assert_matches(qmatmul_triton(x, op, cfg, interpret=True), reference_matmul(x, op))
        dy = random_dy(m, 136, jnp.float32)
        assert_matches(qmatmul_t_triton(dy, op, cfg, interpret=True),
                       reference_matmul_t(dy, op))

    def test_default_config_fits_a_block_size_that_is_not_a_power_of_two(self):
        """B = 96: the default block_k (256) is neither a multiple nor a divisor; it is
        replaced by 32, the largest power of two dividing 96."""
        x, _, op = make_case("int8", dict(block_size=96), 3, 300, 40, jnp.float32)
        p = tq._plan(op, 3, None, transposed=False)
        assert (p.bk, p.sub) == (32, 32)
        assert_matches(qmatmul_triton(x, op, interpret=True), reference_matmul(x, op))

    def test_fp8_decoded_from_bits(self, fp8_bits):
        """The arithmetic float8 decoder (GPUs below sm_89) inside the kernels (every code
        of it, on every backend: test_fp8_decode.py)."""
        x, _, op = make_case("fp8_e5m2", dict(block_size=128), 3, 384, 200, jnp.float32)
        assert tq._plan(op, 3, CONFIGS[3], transposed=False).fp8_bits
        assert_matches(qmatmul_triton(x, op, CONFIGS[3], interpret=True),
                       reference_matmul(x, op))

    @hypothesis.settings(max_examples=2, deadline=None, derandomize=True)
    @hypothesis.given(m=st.integers(1, 40), k=st.integers(20, 300), n=st.integers(16, 90),
                      fmt=st.sampled_from(["int4", "nf4", "int8"]),
                      block=st.sampled_from([32, 64]))
    def test_random_shapes(self, m, k, n, fmt, block):
        """Ragged M, K, N and small blocks; K may be smaller than one block_k."""
        block = min(block, k + k % 2)
        x, _, op = make_case(fmt, dict(block_size=block), m, k, n, jnp.float32)
        cfg = MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=2)
        assert_matches(qmatmul_triton(x, op, cfg, interpret=True), reference_matmul(x, op))
        dy = random_dy(m, n, jnp.float32)
        assert_matches(qmatmul_t_triton(dy, op, cfg, interpret=True),
                       reference_matmul_t(dy, op))

    # -- lowering for the real target ---------------------------------------------------

    KERNELS = {
        # name: (M, config, transposed)
        "decode": (3, MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=1), False),
        "decode-splitk": (1, MatmulConfig(block_m=16, block_n=64, block_k=64, split_k=4),
                          False),
        "tiled": (257, MatmulConfig(block_m=64, block_n=128, block_k=256), False),
        "transposed": (3, MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=2), True),
        "transposed-tiled": (257, MatmulConfig(block_m=64, block_n=64, block_k=64), True),
    }

    @pytest.mark.parametrize("kernel", list(KERNELS))
    @pytest.mark.parametrize("fmt,opts", FORMATS + MX_FORMATS,
                             ids=FORMAT_IDS + [f for f, _ in MX_FORMATS])
    def test_lowers_for_triton(self, fmt, opts, kernel):
        m, cfg, transposed = self.KERNELS[kernel]
        x, _, op = make_case(fmt, opts, m, 1000, 136, jnp.bfloat16)
        if transposed:
            text = _export_cuda(lambda d, op: qmatmul_t_triton(d, op, cfg),
                                random_dy(m, 136, x.dtype), op)
        else:
            text = _export_cuda(lambda x, op: qmatmul_triton(x, op, cfg), x, op)
        assert text.count("__gpu$xla.gpu.triton") == 1   # one kernel, no fallback path

    def test_default_configs_lower(self):
        for m in (1, 300):
            x, _, op = make_case("int4", {}, m, 4096, 512, jnp.bfloat16)
            assert "__gpu$xla.gpu.triton" in _export_cuda(qmatmul_triton, x, op)
            assert "__gpu$xla.gpu.triton" in _export_cuda(qmatmul_t_triton,
                                                          random_dy(m, 512, x.dtype), op)

    def test_fp8_from_bits_lowers(self, fp8_bits):
        m, cfg, _ = self.KERNELS["decode"]
        for fmt, opts in (("fp8_e4m3", {}), ("mxfp8", {})):
            x, _, op = make_case(fmt, opts, m, 1000, 136, jnp.bfloat16)
            text = _export_cuda(lambda x, op: qmatmul_triton(x, op, cfg), x, op)
            assert "__gpu$xla.gpu.triton" in text

    def test_vmapped_kernels_lower(self):
        x, _, op = make_case("nf4", {}, 3, 384, 200, jnp.bfloat16)
        cfg = CONFIGS[3]
        xb = jnp.stack([x, x])
        dyb = jnp.stack([random_dy(3, 200, x.dtype)] * 2)
        assert "__gpu$xla.gpu.triton" in _export_cuda(
            jax.vmap(lambda a: qmatmul_triton(a, op, cfg)), xb)
        assert "__gpu$xla.gpu.triton" in _export_cuda(
            jax.vmap(lambda a: qmatmul_t_triton(a, op, cfg)), dyb)

    # -- what the Triton kernels refuse -------------------------------------------------

    def test_block_k_incompatible_with_block_size(self):
        x, _, op = make_case("nf4", {}, 3, 384, 200, jnp.float32)      # blocks of 64
        bad = MatmulConfig(block_k=48)
        with pytest.raises(ValueError, match=r"block_k=48 .*block_size 64"):
            qmatmul_triton(x, op, bad, interpret=True)
        with pytest.raises(ValueError, match=r"block_k=48 .*block_size 64"):
            qmatmul_t_triton(random_dy(3, 200, jnp.float32), op, bad, interpret=True)

    def test_block_sizes_must_be_powers_of_two(self):
        x, _, op = make_case("int8", {}, 3, 384, 200, jnp.float32)      # per channel
        with pytest.raises(ValueError, match=r"block_k=96 must be a power of two"):
            qmatmul_triton(x, op, MatmulConfig(block_k=96), interpret=True)
        with pytest.raises(ValueError, match=r"block_n=100 must be a power of two"):
            qmatmul_triton(x, op, MatmulConfig(block_n=100), interpret=True)

    def test_scale_blocks_smaller_than_a_dot_are_refused(self):
        x, _, op = make_case("int8", dict(block_size=8), 3, 64, 32, jnp.float32)
        with pytest.raises(ValueError, match=r"block_size 8"):
            qmatmul_triton(x, op, interpret=True)

    def test_mismatched_shapes(self):
        x, _, op = make_case("int4", {}, 3, 384, 200, jnp.float32)
        with pytest.raises(ValueError, match=r"x has K=383 .*K=384"):
            qmatmul_triton(x[:, :383], op, interpret=True)
        with pytest.raises(ValueError, match=r"dy has N=199 .*N=200"):
            qmatmul_t_triton(random_dy(3, 199, jnp.float32), op, interpret=True)
        with pytest.raises(ValueError, match=r"must be 2-D"):
            qmatmul_triton(x[None], op, interpret=True)

    def test_unsupported_dtype(self):
        x, _, op = make_case("int4", {}, 3, 384, 200, jnp.float32)
        with pytest.raises(ValueError, match=r"int32 is not supported"):
            qmatmul_triton(x.astype(jnp.int32), op, interpret=True)

    def test_unaligned_halves_are_refused(self):
        """A 4-bit operand with an odd number of blocks (>1) would start its high-nibble
        half mid-block; the kernels' scale indexing relies on the quantiser never producing
        one."""
        _, _, op = make_case("int4", dict(block_size=64), 3, 192, 40, jnp.float32)
        odd = tq.QOperand(op.data[:96], op.scales[:3], None, op.fmt, 64, 192)
        with pytest.raises(ValueError, match=r"3 blocks"):
            qmatmul_triton(jnp.ones((3, 192)), odd, interpret=True)

    def test_config_sweep_runs(self, capsys):
        """The config sweep prints one row per (format, kernel, M, config)."""
        from qkern._bench import sweep_triton_qmatmul
        sweep_triton_qmatmul.main(["--k", "128", "--n", "64", "--formats", "int4", "--m", "1",
                                   "--configs", "1"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:2] == ["format", "kernel"]
        assert len(out) == 1 + 2
        errs = [float(line.split()[-2]) for line in out[1:]]
        assert max(errs) < 2e-2


def _export_cuda(fn, *args) -> str:
    return _compat.export(fn, "cuda", *args).mlir_module()
