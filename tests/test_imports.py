"""qkern's modules import one way: no cycle among them, counting imports inside functions.

A cycle hidden behind an import inside a function fails when that function is first
called, not at import; this test reads every module's source (no import needed) and fails
on any cycle, naming the modules and the import lines that close it. Imports inside
functions are themselves allowed only where FUNCTION_IMPORTS says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qkern"

# The only imports allowed inside a function or method: (module, imported target) -> why.
# A target covers what lies below it ("safetensors" covers "safetensors.numpy"); an import
# `from X import n` has the target "X.n". Everything else goes at the top of its module.
FUNCTION_IMPORTS = {
    # optional dependencies (pyproject extras): `import qkern` must work without them
    ("qkern._checkpoint", "safetensors"): "the `checkpoint` extra, for save/load only",
    ("qkern.cli", "matplotlib"): "the `bench` extra, for `qkern bench --plot` only",
    ("qkern._bench.qmatmul", "matplotlib"): "the `bench` extra, for the plot only",
    # TPU-only backend pieces, for the TPU interpreter's race detector (tests)
    ("qkern._compat", "jax.experimental.pallas.tpu"): "Mosaic TPU's InterpretParams",
    ("qkern._compat", "jax._src.pallas.mosaic"): "the TPU interpreter's record of races",
    # CLI subcommands: each imports the module it runs
    ("qkern.cli", "qkern._bench"): "`qkern bench`",
    ("qkern.cli", "qkern._demo"): "`qkern demo`",
    # the demo's model loaders
    ("qkern._demo", "qkern._demo.minilm"): "the real-model demo: an ImportError there "
                                           "falls back to the random-weight demo",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module name X of `from X import ...` (relative to `package`)."""
    base = node.module or ""
    if node.level:
        up = package.split(".")
        up = up[:len(up) - (node.level - 1)]
        base = ".".join(up + ([node.module] if node.module else []))
    return base


def _imports(name: str, path: Path, modules: dict) -> dict[str, int]:
    """{imported qkern module: first line} for every import in the module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, package)
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


def _function_imports(name: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(target, line) of every import inside a function or method body of module `name`:
    `import a.b` -> "a.b", `from X import n` -> "X.n" (X made absolute)."""
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes = {id(n): n for f in functions for n in ast.walk(f)          # nested: counted once
             if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in nodes.values():
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        else:
            base = _from_base(node, package)
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return sorted(found, key=lambda t: (t[1], t[0]))


def _allowed_by(name: str, target: str, allowed: dict) -> tuple[str, str] | None:
    """The FUNCTION_IMPORTS key that allows `target` inside a function of `name`, or None."""
    return next(((m, t) for m, t in allowed
                 if m == name and (target == t or target.startswith(t + "."))), None)


def test_function_level_imports_are_allowlisted():
    """Imports go at the top of the module, where `import qkern` runs them (and a broken one
    fails at once); inside a function only for the reasons FUNCTION_IMPORTS gives."""
    unlisted: dict[str, list[str]] = {}        # "path:line" -> targets
    used = set()
    for name, path in _modules().items():
        for target, line in _function_imports(name, path.read_text(), path.name == "__init__.py"):
            key = _allowed_by(name, target, FUNCTION_IMPORTS)
            if key is None:
                where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                unlisted.setdefault(where, []).append(target)
            else:
                used.add(key)
    assert not unlisted, ("imports inside functions; move them to the top of the module, or "
                          "add (module, target) and why to FUNCTION_IMPORTS:\n"
                          + "\n".join(f"  {w}: {', '.join(t)}" for w, t in unlisted.items()))
    assert not set(FUNCTION_IMPORTS) - used, (
        f"FUNCTION_IMPORTS entries no import needs any more: {sorted(set(FUNCTION_IMPORTS) - used)}")


def test_the_function_import_check_finds_an_unlisted_import():
    """The check itself, on a made-up module: imports in functions, methods and nested
    functions are found (module-level ones are not); only allowlisted targets pass."""
    source = ("import os\n"
              "def f():\n"
              "    import json\n"
              "    def g():\n"
              "        from . import _paths\n"
              "class C:\n"
              "    from typing import Any\n"
              "    def m(self):\n"
              "        from .._core import quaxify\n"
              "        import safetensors.numpy as st\n")
    found = _function_imports("qkern.recipes._apply", source)
    assert found == [("json", 3), ("qkern.recipes._paths", 5), ("qkern._core.quaxify", 9),
                     ("safetensors.numpy", 10)]
    allowed = {("qkern.recipes._apply", "safetensors"): "optional", ("qkern.cli", "json"): "x"}
    assert [t for t, _ in found if _allowed_by("qkern.recipes._apply", t, allowed) is None] == [
        "json", "qkern.recipes._paths", "qkern._core.quaxify"]


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
