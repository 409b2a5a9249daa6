"""Sharded QArrays (jit with NamedSharding, shard_map) on 8 host CPU devices.

XLA reads --xla_force_host_platform_device_count when JAX starts, and the test session has
started it already, so the checks run in a fresh interpreter: tests/sharding/sharded_checks.py,
which asserts each property and prints "ok <check>" lines. The partitioning helpers that
need no devices are tested here directly.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qkern

SCRIPT = pathlib.Path(__file__).with_name("sharded_checks.py")
CHECKS = ["jit with NamedSharding equals unsharded", "scales are sharded alongside their data",
          "per-device bytes drop by the model axis", "shard_map: each device runs its own QArray shard",
          "shard_map: column-parallel W8A8 equals unsharded exactly",
          "shard_map over a stacked QArray and scan inside",
          "shard_map check_vma: column-parallel int8/int4/nf4/W8A8 equal unsharded",
          "shard_map check_vma: row-parallel with psum, int8/int4/nf4/W8A8 equal unsharded",
          "shard_map check_vma: lax.scan over stacked column/row-parallel layers",
          "shard_map check_vma: grads with respect to x equal unsharded",
          "bad shardings name the QArray and the reason",
          "per-channel weights shard along K (row-parallel): jit and shard_map equal unsharded",
          "shard_map check_vma: QLoRA grads of the factors equal unsharded",
          "shard_map check_vma: forward mode (jvp, forward-over-reverse HVP) equals unsharded",
          "shard_map check_vma: QLoRA jvp in the factors and x equals unsharded",
          "explicit mesh: jvp and grad of a sharded weight's matmul equal unsharded",
          "explicit mesh: materialise a sharded nf4 QArray under jit",
          "explicit mesh: jit with NamedSharding, every format, equals unsharded",
          "explicit mesh: row-parallel, several K chunks per device, equals unsharded",
          "decode (M = 1) on a sharded weight: the scan, not the native kernel; equals unsharded",
          "a LoraArray takes its dense weight's spec (rank axis whole); a vmap-built stack shards"]


@pytest.fixture(scope="module")
def run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = SCRIPT.parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=600)


def _check_passed(run, check):
    return f"ok {check}\n" in run.stdout


@pytest.mark.parametrize("check", CHECKS)
def test_sharded_check(run, check):
    assert _check_passed(run, check), (
        f"check {check!r} did not pass (exit {run.returncode}).\nstdout:\n{run.stdout}\n"
        f"stderr (tail):\n{run.stderr[-4000:]}")


def test_script_finished(run):
    assert run.returncode == 0 and "ALL OK" in run.stdout, (run.stdout[-4000:], run.stderr[-4000:])
    ran = {line[3:] for line in run.stdout.splitlines() if line.startswith("ok ")}
    assert ran == set(CHECKS), ran ^ set(CHECKS)


def _q(fmt="int8", **kw):
    return qkern.quantize(jnp.asarray(np.ones((256, 64), np.float32)), fmt, **kw)


def test_partition_specs_follow_the_dense_spec():
    q = _q(block_size=64)
    s = qkern.partition_specs({"w": q, "b": jnp.ones(64)}, {"w": P("x", "y"), "b": P("y")})
    assert s["w"].data == P("x", "y") and s["w"].scales == P("x", "y")
    assert s["b"] == P("y")
    per_channel = qkern.partition_specs(_q(), P("x", "y"))
    assert per_channel.scales == P(None, "y")          # one scale row: nothing to split
    per_tensor = qkern.partition_specs(_q(axis=None), P(None, "y"))
    assert per_tensor.scales == P(None, None)


def test_partition_specs_of_a_transposed_qarray_use_logical_axes():
    t = qkern.quaxify(lambda w: w.T)(_q(block_size=64))     # logical [64, 256]
    s = qkern.partition_specs(t, P("y", None))
    assert s.data == P(None, "y") and s.scales == P(None, "y")


def test_block_axis_of_packed_formats_cannot_be_sharded():
    with pytest.raises(ValueError, match="packs the two halves"):
        qkern.partition_specs(_q("nf4"), P("x", None))
    with pytest.raises(ValueError, match="padded"):
        qkern.partition_specs(qkern.quantize(jnp.ones((100, 64)), "int8", block_size=64),
                              P("x", None))
    # a spec on a subtree applies to all of it
    s = qkern.partition_specs({"a": {"w": _q(), "v": _q()}, "b": _q()}, {"a": P(None, "y")})
    assert s["a"]["w"].data == P(None, "y") and s["a"]["v"].data == P(None, "y")
    assert s["b"].data == P(None, None)
    # a callable picks specs by path
    s = qkern.partition_specs({"a": _q("nf4")}, lambda path, v: P(None, "y"))
    assert s["a"].data == P(None, "y")
