"""Stacked quantised experts sharded along the experts axis (4 host CPU devices, in a
fresh interpreter: tests/ragged/sharded_ragged.py)."""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("sharded_ragged.py")


def test_experts_sharded_along_e_equal_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    root = SCRIPT.parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    assert run.returncode == 0 and "ALL OK" in run.stdout, (run.stdout[-3000:],
                                                            run.stderr[-3000:])
    assert run.stdout.count("ok experts sharded") == 3, run.stdout
