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
