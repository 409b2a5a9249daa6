"""The docs' code blocks run exactly as written, in order, one namespace per page."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = ["docs/custom-types.md", "docs/formats.md", "docs/qlora.md", "README.md"]


def python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page):
    blocks = python_blocks(ROOT / page)
    assert blocks, f"{page} has no python blocks"
    namespace: dict = {"__name__": f"docs_{page}"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{page}[block {i}]", "exec")
        exec(code, namespace)
