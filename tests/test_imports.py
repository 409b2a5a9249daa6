"""qkern's modules import one way: no cycle among them, counting imports inside functions.

A cycle hidden behind an import inside a function fails when that function is first
called, not at import; this test reads every module's source (no import needed) and fails
on any cycle, naming the modules and the import lines that close it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qkern"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> dict[str, int]:
    """{imported qkern module: first line} for every import in the module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import sub` depends on the submodule; `from mod import name` on mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        for t in targets:
            if t in modules and t != name:
                found.setdefault(t, node.lineno)
    return found


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        detail += [f"  {m} -> {t} (line {line})" for m in comp
                   for t, line in sorted(graph[m].items()) if t in members]
    assert not cycles, "import cycles among qkern's modules:\n" + "\n".join(detail)


def test_the_cycle_finder_finds_a_cycle():
    """The check itself: a two-module cycle through an import inside a function."""
    graph = {"qkern.a": {"qkern.b": 3}, "qkern.b": {"qkern.a": 9}, "qkern.c": {"qkern.a": 1}}
    assert _cycles(graph) == [["qkern.a", "qkern.b"]]


@pytest.mark.parametrize("module", ["qkern.pallas._config", "qkern.pallas", "qkern._core",
                                    "qkern.formats"])
def test_kernel_and_core_packages_do_not_reach_up(module):
    """The kernels and the dispatch core never import the public package, QArray's types,
    or the autotuner (which registers itself with pallas/_config instead)."""
    graph = _graph()
    seen, todo = set(), [m for m in graph if m == module or m.startswith(module + ".")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph[m])
    assert not {"qkern", "qkern.types", "qkern.types.qarray", "qkern.autotune",
                "qkern.autotune._cache"} & seen, sorted(seen)


@pytest.mark.parametrize("name", ["sweep_triton_qmatmul", "sweep_mosaic_qmatmul",
                                  "sweep_triton_lora", "sweep_mosaic_lora",
                                  "sweep_triton_w8a8", "sweep_mosaic_w8a8"])
def test_every_kernel_sweep_imports_and_has_main(name):
    """The kernels' config sweeps live in qkern/_bench (each runs as `python -m`); the
    triton qmatmul and w8a8 ones are run by their kernels' tests."""
    import importlib
    mod = importlib.import_module(f"qkern._bench.{name}")
    assert callable(mod.main)
