"""docs/models.md on 8 host devices. tests/docs runs every page, this one included, on the
devices the test process has (one CPU device, usually); the sharding examples use every
device there is, so here they run again with 8 (a 1x8 mesh), where each sharded weight
must split 8 ways, per-channel ones along their single block included. Same runner as
tests/docs (templates skipped, blocks in order, one namespace)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

_EIGHT_DEVICES = """
import importlib.util, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
assert jax.device_count() == 8, jax.devices()
spec = importlib.util.spec_from_file_location("docs_runner", sys.argv[1])
runner = sys.modules["docs_runner"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
print("PAGE OK", runner.run_page("docs/models.md"), "blocks")
"""


def test_models_page_runs_on_eight_devices():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES, str(ROOT / "tests" / "docs" / "test_docs_run.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "PAGE OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
