"""The fused QLoRA matmul on the Mosaic TPU backend (qkern/pallas/lora_qmatmul/_mosaic.py),
without a TPU: the contract (contract_lora.py) in interpret mode, plus what is Mosaic's own:

* the fused kernel's y and xu against `reference`, both directions, for explicit configs
  and the planner's choices: int8, int4 with zero points, nf4 and fp8_e4m3; per-channel and
  sub-channel scales (one-step and multi-step K tilings, a masked K tail, the high nibble
  stream's scale offset); float32, bfloat16 and float16 x and factors; M = 1, 3, 16 and 40;
  ragged K and N; r = 4 and 12; both ways of producing xu (shared across column tiles, or
  per tile), also under vmap;
* the TPU interpreter's race detector on small grids, two simulated cores;
* lowering for TPU with jax.export, for every kernel and xu mode;
* the factors, configs and dtypes it refuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qkern import _compat
from qkern.pallas._config import MatmulConfig
from qkern.pallas.lora_qmatmul._mosaic import lora_qmatmul_mosaic, plan_lora_mosaic

from .contract_lora import SCALE, LoraContract, check_lora, lora_case

# fmt, opts, (M, K, N), r, dtype, config, expected (kernel, shared, nk) forward
_CASES = [
    # decode, per-channel, 4 K steps with a masked tail
    ("int8", {}, (1, 1000, 256), 4, jnp.float32, MatmulConfig(block_k=256),
     ("decode", False, 4)),
    # decode, zero points, the whole K in one step (whole scale strip), ragged N
    ("int4", dict(calibration="minmax"), (3, 384, 200), 12, jnp.bfloat16, None,
     ("decode", False, 1)),
    # decode at 16 rows, per-stream scale blocks over 2 K steps, 2 N tiles (ragged)
    ("nf4", {}, (16, 2048, 136), 12, jnp.float32, MatmulConfig(block_n=128, block_k=512),
     ("decode", False, 2)),
    # tiled with 3 M tiles: xu shared across the N tiles; bfloat16 factors; ragged N;
    # 2 K steps (block_k 256), the second a masked tail
    ("fp8_e4m3", {}, (40, 320, 260), 4, jnp.bfloat16, MatmulConfig(block_m=16),
     ("tiled", True, 2)),
]
_IDS = [f"{c[0]}{'-minmax' if c[1] else ''}-{'x'.join(map(str, c[2]))}-r{c[3]}-"
        f"{jnp.dtype(c[4]).name}" for c in _CASES]

# Small grids: 2-3 steps on every axis. "per tile": the N axis is parallel and each N tile
# writes its own xu slice. "shared": 3 M tiles on the parallel axis; the column and K axes
# are sequential and the first column tile's xu block is read by the later ones.
_RACE = [
    ("per-tile-decode", (3, 256, 256), MatmulConfig(block_n=128, block_k=128), False, False),
    ("shared-tiled", (20, 256, 256), MatmulConfig(block_m=8, block_n=128, block_k=128),
     False, True),
    ("shared-transposed", (20, 256, 256), MatmulConfig(block_m=8, block_n=128, block_k=128),
     True, True),
]

_LOWER = {
    # name: ((M, K, N), dtype, config, transposed, expected (shared, multi-step K))
    "decode": ((3, 384, 200), jnp.bfloat16, None, False, (False, False)),
    "decode-multistep": ((1, 4096, 384), jnp.float32, None, False, (False, True)),
    "tiled-per-tile": ((40, 320, 260), jnp.bfloat16, None, False, (False, False)),
    "tiled-shared": ((64, 4096, 256), jnp.float32, MatmulConfig(block_m=32, block_k=1024),
                     False, (True, True)),
    "transposed-per-tile": ((3, 384, 200), jnp.bfloat16, None, True, (False, False)),
    "transposed-shared": ((40, 4096, 384), jnp.float32,
                          MatmulConfig(block_m=16, block_k=1024), True, (True, True)),
}
_LOWER_FORMATS = [("int8", {}), ("int4", dict(calibration="minmax")), ("nf4", {}),
                  ("fp8_e4m3", {})]


class TestMosaic(LoraContract):
    backend = "mosaic_tpu"
    interpret = True

    # -- the fused kernel's (y, xu), the planner ------------------------------------------

    @pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
    @pytest.mark.parametrize("fmt,opts,shape,r,dtype,cfg,expect", _CASES, ids=_IDS)
    def test_kernel_matches_reference(self, fmt, opts, shape, r, dtype, cfg, expect,
                                      transposed):
        m, k, n = shape
        x, op, u, v = lora_case(fmt, opts, m, k, n, r, dtype, transposed)
        if dtype == jnp.bfloat16 and m > 16:
            u, v = u.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
        lp = plan_lora_mosaic(op, m, dtype, r, cfg, transposed=transposed)
        if not transposed:
            assert (lp.base.kernel, lp.shared, lp.base.nk) == expect
        y, xu = lora_qmatmul_mosaic(x, op, u, v, SCALE, cfg, transposed=transposed,
                                    interpret=True)
        assert y.dtype == x.dtype and xu.dtype == jnp.float32
        check_lora(y, xu, x, op, u, v, transposed)

    def test_float16_runs_as_float32(self):
        x, op, u, v = lora_case("int8", {}, 2, 256, 128, 4, jnp.float16)
        y, xu = lora_qmatmul_mosaic(x, op, u, v, SCALE, interpret=True)
        assert y.dtype == jnp.float16
        check_lora(y, xu, x, op, u, v, False)

    def test_vmap_in_shared_mode(self):
        """vmap prepends a grid axis; the shared xu block still works (and still lowers)."""
        cfg = MatmulConfig(block_m=8, block_n=128, block_k=128)
        x, op, u, v = lora_case("int8", {}, 20, 256, 256, 4, jnp.float32, transposed=True)
        assert plan_lora_mosaic(op, 20, x.dtype, 4, cfg, transposed=True).shared
        xs = jnp.stack([x, -2 * x])
        f = jax.vmap(lambda a: lora_qmatmul_mosaic(a, op, u, v, SCALE, cfg, transposed=True,
                                                   interpret=True))
        ys, xus = jax.jit(f)(xs)
        for b in range(2):
            check_lora(ys[b], xus[b], xs[b], op, u, v, True)
        g = jax.vmap(lambda a: lora_qmatmul_mosaic(a, op, u, v, SCALE, cfg, transposed=True))
        assert "tpu_custom_call" in _compat.export(g, "tpu", xs).mlir_module()

    # -- race detection (TPU interpreter, two simulated cores) ----------------------------

    @pytest.mark.parametrize("name,shape,cfg,transposed,shared", _RACE,
                             ids=[c[0] for c in _RACE])
    def test_no_races(self, name, shape, cfg, transposed, shared, race_params):
        m, k, n = shape
        x, op, u, v = lora_case("int8", {}, m, k, n, 4, jnp.float32, transposed, seed=4)
        lp = plan_lora_mosaic(op, m, x.dtype, 4, cfg, transposed=transposed)
        assert lp.shared == shared and lp.base.nk == 2 and lp.base.nn == 2
        y, xu = jax.block_until_ready(lora_qmatmul_mosaic(x, op, u, v, SCALE, cfg,
                                                          transposed=transposed,
                                                          interpret=race_params))
        assert not _compat.tpu_races_found()
        check_lora(y, xu, x, op, u, v, transposed)

    # -- lowering for TPU -----------------------------------------------------------------

    @pytest.mark.parametrize("kernel", list(_LOWER))
    @pytest.mark.parametrize("fmt,opts", _LOWER_FORMATS,
                             ids=["int8", "int4-minmax", "nf4", "fp8_e4m3"])
    def test_lowers_for_tpu(self, fmt, opts, kernel):
        (m, k, n), dtype, cfg, transposed, (shared, multistep) = _LOWER[kernel]
        x, op, u, v = lora_case(fmt, opts, m, k, n, 12, dtype, transposed)
        lp = plan_lora_mosaic(op, m, dtype, 12, cfg, transposed=transposed)
        assert lp.shared == shared and (lp.base.nk > 1) == multistep
        f = lambda x, op, u, v: lora_qmatmul_mosaic(x, op, u, v, SCALE, cfg,  # noqa: E731
                                                    transposed=transposed)
        text = _compat.export(f, "tpu", x, op, u, v).mlir_module()
        assert text.count("tpu_custom_call") == 1

    # -- what the Mosaic kernels refuse ---------------------------------------------------

    def test_bad_factors_configs_and_dtypes(self):
        x, op, u, v = lora_case("nf4", {}, 3, 512, 256, 4, jnp.float32)
        call = lambda *a, **kw: lora_qmatmul_mosaic(*a, interpret=True, **kw)  # noqa: E731
        with pytest.raises(ValueError, match=r"factors u \(512, 4\) and v \(4, 200\)"):
            call(x, op, u, v[:, :200], SCALE)
        with pytest.raises(ValueError, match=r"must be \[256, r\] and \[r, 512\]"):
            call(x[:, :256], op, u, v, SCALE, transposed=True)
        with pytest.raises(ValueError, match=r"factor u has dtype int8"):
            call(x, op, u.astype(jnp.int8), v, SCALE)
        with pytest.raises(ValueError, match=r"x dtype int32 is not supported"):
            call(x.astype(jnp.int32), op, u, v, SCALE)
        with pytest.raises(ValueError, match=r"x has K=500"):
            call(x[:, :500], op, u, v, SCALE)
        with pytest.raises(ValueError, match=r"block_n=200 is not a multiple of 128"):
            call(x, op, u, v, SCALE, MatmulConfig(block_n=200))
