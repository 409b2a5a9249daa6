"""docs/models.md: its code blocks run exactly as written, in order, in one namespace."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "models.md"


def test_models_page_runs():
    for extra, module in [("flax", "flax.nnx"), ("equinox", "equinox"), ("checkpoint", "safetensors")]:
        pytest.importorskip(module, reason=f"docs/models.md needs the `{extra}` extra")
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 8
    namespace: dict = {"__name__": "docs_models"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/models.md[block {i}]", "exec"), namespace)


_EIGHT_DEVICES = """
import os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
assert jax.device_count() == 8
page = open(sys.argv[1]).read()
namespace = {"__name__": "docs_models"}
for i, block in enumerate(re.findall(r"```python\\n(.*?)```", page, flags=re.S)):
    exec(compile(block, f"docs/models.md[block {i}]", "exec"), namespace)
print("PAGE OK")
"""


def test_models_page_runs_on_eight_devices():
    """The sharding examples use every device there is: with 8 (a 1x8 mesh) each sharded
    weight must split 8 ways, per-channel ones along their single block included."""
    import os
    import subprocess
    import sys

    for extra, module in [("flax", "flax.nnx"), ("equinox", "equinox"), ("checkpoint", "safetensors")]:
        pytest.importorskip(module, reason=f"docs/models.md needs the `{extra}` extra")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(PAGE)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "PAGE OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
