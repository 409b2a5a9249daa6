"""The xla kernels on a mesh with Explicit axes (JAX's sharding-in-types mode, the
`jax.make_mesh` default): column- and row-parallel layers, W8A8 and QLoRA, forward and
gradients, against unsharded results. XLA reads the host device count when JAX starts, so
the checks run in a fresh interpreter (explicit_mesh_checks.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("explicit_mesh_checks.py")
CHECKS = ["column-parallel: every format, forward and dx, equal unsharded",
          "row-parallel: K sharded, several chunks per device, forward and dx equal unsharded",
          "QLoRA: gradients of a, b and x equal unsharded, each sharded like its input"]


@pytest.fixture(scope="module")
def run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", QKERN_BACKEND="xla")
    root = SCRIPT.parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=600)


@pytest.mark.parametrize("check", CHECKS)
def test_explicit_mesh(run, check):
    assert f"ok {check}\n" in run.stdout, (
        f"check {check!r} did not pass.\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-6000:]}")
