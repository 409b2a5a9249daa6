"""Search spaces and pruning (pure Python: runs on any machine, times nothing)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

import qkern
from qkern.autotune import _space
from qkern.pallas._config import MatmulConfig, Problem
from qkern.pallas.qmatmul._mosaic import plan_mosaic
from qkern.pallas._operand import stored_operand
from qkern.pallas._triton_common import smem_limit
from qkern.pallas.lora_qmatmul._mosaic import plan_lora_mosaic
from qkern.pallas.qmatmul._triton import _plan as triton_plan
from qkern.pallas.qmatmul._triton import smem_bytes
from qkern.pallas.w8a8._mosaic import plan_mosaic_w8a8
from qkern.pallas.w8a8._triton import plan_triton_w8a8


@functools.lru_cache(maxsize=None)
def _op(k, n, fmt, block_size=None):
    w = jax.random.normal(jax.random.PRNGKey(0), (k, n))
    return stored_operand(qkern.quantize(w, fmt, block_size=block_size))


def _problem(backend, m, k, n, fmt, op, kernel="qmatmul", dtype="bfloat16", rank=0):
    return Problem(backend, kernel, m, k, n, dtype, fmt, op.block_size, op.zeros is not None,
                   rank)


def test_xla_space_is_block_k_deduplicated_by_the_chunk_the_scan_uses(monkeypatch):
    op = _op(256, 128, "int8")                                    # one block of 256 rows
    p = _problem("xla", 64, 256, 128, "int8", op)   # bfloat16 x: M past the native kernel
    configs, pruned = _space.candidates(p, op)
    assert [c.block_k for c in configs if not c.dequantize] == [64, 128, 256]
    assert [c.dequantize for c in configs].count(True) == 1      # and dequantise-then-dot
    assert {c.block_k for c, _ in pruned} == {512, 1024, 2048}
    assert all("same chunk of 256 rows" in why for _, why in pruned)


def test_xla_space_respects_scale_blocks():
    op = _op(1024, 128, "nf4")                                    # blocks of 64, 2 streams
    p = _problem("xla", 16, 1024, 128, "nf4", op, dtype="float32")
    configs, _ = _space.candidates(p, op)
    ks = [c.block_k for c in configs]
    assert ks == sorted(set(ks)) and all(k % 64 == 0 and 512 % k == 0 for k in ks)


def test_xla_space_is_one_config_where_the_native_kernel_runs():
    from qkern.pallas.qmatmul import _native

    op = _op(1024, 128, "nf4")
    p = _problem("xla", 1, 1024, 128, "nf4", op, dtype="float32")
    configs, pruned = _space.candidates(p, op)
    if _native.runs_for(1, op):      # built on this machine (tests/pallas/test_native.py)
        assert len(configs) == 1 and pruned
        assert all("native CPU kernel" in why for _, why in pruned)
    else:
        assert len(configs) > 1
    # the gradient's kernel (dy @ W.T) is always the scan
    t_configs, _ = _space.candidates(_problem("xla", 1, 1024, 128, "nf4", op,
                                              kernel="qmatmul_t", dtype="float32"), op)
    assert len(t_configs) > 1


@pytest.mark.parametrize("m, kernel", [(1, "qmatmul"), (256, "qmatmul"), (4, "qmatmul_t")])
def test_triton_candidates_are_all_accepted_by_the_kernel_and_fit(m, kernel):
    op = _op(1024, 512, "int4", block_size=96)   # 96: block_k must divide it or be a multiple
    p = _problem("triton", m, 1024, 512, "int4", op, kernel=kernel)
    configs, pruned = _space.candidates(p, op, max_configs=None,
                                        device_kind="NVIDIA H100 80GB HBM3")
    assert configs and pruned
    # for M > 16 one more candidate: dequantise-then-dot, which no kernel plans
    assert sum(c.dequantize for c in configs) == (m > 16)
    configs = [c for c in configs if not c.dequantize]
    limit, _ = smem_limit("NVIDIA H100 80GB HBM3")
    tilings = set()
    for c in configs:
        plan = triton_plan(op, m, c, transposed=kernel == "qmatmul_t")   # does not raise
        assert smem_bytes(plan, 2, 1, kernel == "qmatmul_t") <= limit
        tilings.add((plan.bm, plan.bn, plan.bk, plan.split, plan.num_warps, plan.num_stages))
    assert len(tilings) == len(configs)                          # no two time the same tiling
    reasons = " ".join(why for _, why in pruned)
    assert "rejected by the kernel" in reasons and "block_size" in reasons   # bk=64 vs 96
    if m <= 16:
        assert {c.block_m for c in configs} == {16}
    else:
        assert {c.split_k for c in configs} == {1}


def test_triton_shared_memory_limit_depends_on_the_gpu():
    op = _op(1024, 1024, "int8")
    p = _problem("triton", 256, 1024, 1024, "int8", op)
    big, _ = _space.candidates(p, op, max_configs=None, device_kind="NVIDIA H100 80GB HBM3")
    small, pruned = _space.candidates(p, op, max_configs=None, device_kind="Tesla T4")
    assert len(small) < len(big)
    assert any("shared memory" in why and "T4" in why for _, why in pruned)


def test_clamping_to_a_small_problem_removes_duplicates():
    op = _op(256, 64, "int8")
    p = _problem("triton", 1, 256, 64, "int8", op)
    configs, pruned = _space.candidates(p, op, max_configs=None)
    assert {c.block_n for c in configs} <= {32, 64}              # 128 and 256 clamp to 64
    assert any("same tiling" in why for _, why in pruned)


def test_mosaic_candidates_are_legal_tpu_tilings():
    op = _op(2048, 1024, "nf4")                                  # blocks of 64
    p = _problem("mosaic_tpu", 256, 2048, 1024, "nf4", op)
    configs, pruned = _space.candidates(p, op, max_configs=None)
    assert configs
    for c in configs:
        plan = plan_mosaic(op, 256, "bfloat16", c, kernel="tiled")    # does not raise
        assert plan.bn % 128 == 0 or plan.bn == 1024
    # block_k=256 holds 4 scale rows of 64: not a multiple of 8 sublanes
    assert any(c.block_k == 256 and "multiple of 8" in why for c, why in pruned)


def test_cap_keeps_the_configs_nearest_the_heuristic():
    op = _op(1024, 1024, "int4")
    p = _problem("triton", 1, 1024, 1024, "int4", op)
    every, _ = _space.candidates(p, op, max_configs=None, device_kind="NVIDIA H100")
    capped, pruned = _space.candidates(p, op, max_configs=5, device_kind="NVIDIA H100")
    assert len(capped) == 5 and set(capped) <= set(every)
    heuristic = MatmulConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=3,
                             split_k=4)

    def tiling(c):
        q = triton_plan(op, 1, c, transposed=False)
        return q.bm, q.bn, q.bk, q.split, q.num_warps, q.num_stages

    assert tiling(heuristic) in {tiling(c) for c in capped}   # (or its equal after clamping)
    assert sum("nearest the heuristic" in why for _, why in pruned) == len(every) - 5


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("m", [1, 256])
def test_w8a8_candidates_are_accepted_by_its_own_planner(backend, m):
    """W8A8 has its own space: every candidate plans with the W8A8 kernel's planner, no two
    share a tiling, and no dequantise-then-dot entry (it is not a weight-only kernel)."""
    op = _op(1024, 512, "int8", block_size=128)
    p = _problem(backend, m, 1024, 512, "int8", op, kernel="w8a8")
    configs, pruned = _space.candidates(p, op, max_configs=None, device_kind="NVIDIA H100")
    assert configs and not any(c.dequantize for c in configs)
    if backend == "triton":
        plans = [plan_triton_w8a8(op, m, c) for c in configs]
        tilings = {(q.bm, q.bn, q.bk, q.split, q.num_warps, q.num_stages) for q in plans}
    else:
        plans = [plan_mosaic_w8a8(op, m, "bfloat16", c) for c in configs]
        tilings = {(q.bm, q.bn, q.tk, q.nk) for q in plans}
        assert any("multiple" in why for _, why in pruned)        # block_k 256 < 8 blocks
    assert len(tilings) == len(configs)


def test_w8a8_xla_space_is_the_chunk_of_its_int8_product():
    op = _op(1024, 128, "int8")                                   # per channel: one block
    p = _problem("xla", 32, 1024, 128, "int8", op, kernel="w8a8", dtype="float32")
    configs, pruned = _space.candidates(p, op)
    assert [c.block_k for c in configs] == [64, 128, 256, 512, 1024]
    assert [c.block_k for c, _ in pruned] == [2048]               # whole K, as 1024 is


def test_w8a8_xla_space_below_8_rows_is_the_native_kernel_alone():
    """Where W8A8 runs the native int8 kernel (M < 8 on x86-64) block_k is never read: one
    config, the rest pruned saying why."""
    from qkern.pallas.qmatmul import _native
    op = _op(1024, 128, "int8")
    p = _problem("xla", 1, 1024, 128, "int8", op, kernel="w8a8", dtype="float32")
    configs, pruned = _space.candidates(p, op)
    if not _native.runs_for(1, op):                  # no native kernels on this machine
        assert len(configs) > 1
        return
    assert len(configs) == 1 and len(pruned) == 6
    assert all("native CPU kernel runs at this M" in why for _, why in pruned)


@pytest.mark.parametrize("kernel", ["lora", "lora_t"])
def test_lora_mosaic_candidates_budget_for_the_rank(kernel):
    """The fused LoRA kernel's Mosaic space is planned for the problem's rank: a larger rank
    needs more VMEM for u, v and xu, so it never keeps more configs."""
    op = _op(2048, 2048, "int8")
    small = _problem("mosaic_tpu", 512, 2048, 2048, "int8", op, kernel=kernel, rank=8)
    large = dataclasses.replace(small, rank=2048)
    few, pruned = _space.candidates(large, op, max_configs=None)
    many, _ = _space.candidates(small, op, max_configs=None)
    assert few and len(few) < len(many)
    assert any("fused LoRA tiling needs" in why for _, why in pruned)
    for c in few:
        plan_lora_mosaic(op, 512, "bfloat16", 2048, c, transposed=kernel == "lora_t")


@pytest.mark.parametrize("kernel", ["w8a8", "lora"])
def test_lowering_check_covers_every_family(kernel):
    op = _op(256, 256, "int8")
    p = _problem("triton", 64, 256, 256, "int8", op, kernel=kernel, rank=4 * (kernel == "lora"))
    cfg = MatmulConfig(block_m=32, block_n=64, block_k=64)
    assert _space.lowering_error(p, op, cfg) is None
    assert _space.lowering_error(dataclasses.replace(p, backend="mosaic_tpu"), op,
                                 MatmulConfig(block_m=32, block_n=128, block_k=256)) is None


def test_unknown_backend():
    op = _op(256, 128, "int8")
    with pytest.raises(ValueError, match="unknown backend"):
        _space.candidates(_problem("cuda", 1, 256, 128, "int8", op), op)


def test_dry_run_plans_gpu_kernels_from_a_cpu_host():
    results = qkern.autotune(m=(1, 256), k=1024, n=1024, formats="int4", backend="triton",
                             dry_run=True, max_configs=8)
    assert [r.problem.m for r in results] == [1, 256]
    # 8 kernel configs, plus dequantise-then-dot for M = 256
    assert [len(r.timings) for r in results] == [8, 9]
    assert all(r.problem.x_dtype == "bfloat16" for r in results)
    assert all(np.isnan(r.time_s) for r in results)


def test_lowering_check_from_a_cpu_host():
    op = _op(1024, 256, "nf4")
    p = _problem("mosaic_tpu", 1, 1024, 256, "nf4", op)
    assert _space.lowering_error(p, op, MatmulConfig(block_m=16, block_n=128, block_k=512)) is None
    why = _space.lowering_error(p, op, MatmulConfig(block_m=16, block_n=128, block_k=256))
    assert why.startswith("does not lower for tpu") and "multiple of 8" in why
