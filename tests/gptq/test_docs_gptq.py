"""docs/gptq.md's code blocks run exactly as written, in order, in one namespace (as
tests/docs does for the pages it lists)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gptq_page_runs():
    page = ROOT / "docs" / "gptq.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "docs_gptq"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/gptq.md[block {i}]", "exec"), namespace)
