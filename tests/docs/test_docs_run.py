"""Every docs page's code runs as a test: README.md and every docs/*.md, found by glob, so a
new page cannot be missed.

Python blocks (```python fences, indented ones inside lists included) run as written, in
order, in one fresh namespace per page. A block that is illustrative and cannot run as it
stands (it needs your own package, a GPU, or minutes) is a **template**, marked for
readers too by its first line:

    # template: <why it is not run>

Templates are compiled (a syntax error fails) but not run. Any other python block that
raises fails its page, with the page, block and line in the message; the traceback shows
the page's own lines.

Blocks fenced as bash, sh or console are not run; their commands are checked instead, as
are the `qkern ...`, `pip install ...`, `python ...` and `pytest ...` commands quoted inline
in the text and the `$ ...` lines of text blocks: qkern's own parser must accept every
`qkern` command, `python path.py`, `pytest path` and `python -m module` must name a file or
module that exists, and `pip install` extras must be in pyproject.toml. Every fence names a
language this test knows (python, a shell, text, json, or none for plain output), so a
python block cannot go unrun behind `py` or `python3`. Relative links must reach a file
and, with `#anchor`, one of its headings; repository paths the prose names (qkern/...,
tests/..., bench/..., docs/...) must exist.

tests/interop/test_docs_models.py runs docs/models.md again on 8 host devices with
`run_page` from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import pathlib
import re
import shlex
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = "# template:"
PYTHON = "python"
SHELLS = frozenset({"bash", "sh", "console"})
NOT_RUN = frozenset({"", "text", "json"})   # output, formulas, file layouts


def pages() -> list[str]:
    """README.md and every docs/*.md, as paths relative to the repository root."""
    return ["README.md"] + sorted(p.relative_to(ROOT).as_posix()
                                  for p in (ROOT / "docs").glob("*.md"))


@dataclasses.dataclass(frozen=True)
class Block:
    info: str   # the fence's info string, e.g. "python" or "bash"
    code: str   # the body, with the fence's indentation removed
    line: int   # line of the page where the body starts (1-based)
    end: int    # line of the closing fence

    @property
    def template(self) -> str | None:
        """Why the block is not run, if it is a template; else None."""
        first = self.code.lstrip("\n").split("\n", 1)[0].strip()
        return first[len(TEMPLATE):].strip() if first.startswith(TEMPLATE) else None


_OPEN = re.compile(r"^( *)(`{3,}|~{3,})(.*)$")


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    lines = text.split("\n")
    found, i = [], 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        close = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}} *$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: the fence opened here is never closed")
        body = [ln[min(indent, len(ln) - len(ln.lstrip(" "))):] for ln in lines[i + 1:j]]
        found.append(Block(info, "\n".join(body) + "\n", i + 2, j + 1))
        i = j + 1
    return found


def python_blocks(text: str) -> list[Block]:
    return [b for b in blocks(text) if b.info == PYTHON]


def run_page(page: str, text: str | None = None) -> int:
    """Run the page's python blocks, templates excepted, in order in one fresh namespace.

    Returns how many blocks ran. `text` replaces the file's contents (for the tests of this
    runner)."""
    path = ROOT / page
    text = path.read_text() if text is None else text
    namespace: dict = {"__name__": f"docs:{page}"}
    ran = 0
    for n, block in enumerate(python_blocks(text)):
        # padded so that tracebacks give the page's own line numbers (and show its lines)
        # dont_inherit: the page's code gets none of this module's __future__ imports
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec",
                       dont_inherit=True)
        if block.template is not None:
            continue
        try:
            exec(code, namespace)
        except Exception as err:
            err.add_note(f"{page}: python block {n} (line {block.line}) failed. Fix the page; "
                         f"if the block cannot run as it stands, make its first line "
                         f"'{TEMPLATE} <why>'.")
            raise
        ran += 1
    return ran


# --------------------------------------------------------------------------------------
# commands shown in shell blocks and quoted inline
# --------------------------------------------------------------------------------------

_INLINE = re.compile(r"`((?:qkern|pip3? install|python3?|pytest) [^`]+)`")
_OPERATORS = {"&&", "||", ";", "|", "&"}
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def commands(text: str) -> list[tuple[int, str]]:
    """(line, command line) for every command a page shows: bash and sh blocks (backslash
    continuations joined), the `$ ` lines of console and text blocks, and commands quoted
    inline in the prose."""
    found = []
    for block in blocks(text):
        prompted = block.info in ("console", "text")
        if block.info in SHELLS or prompted:
            logical, start = "", None
            for k, ln in enumerate(block.code.split("\n")):
                start = block.line + k if start is None else start
                logical += ln.rstrip("\\")
                if ln.endswith("\\"):
                    continue
                cmd, logical = logical.strip(), ""
                if prompted and not cmd.startswith("$ "):
                    cmd = ""
                cmd = cmd[2:] if cmd.startswith("$ ") else cmd
                if cmd and not cmd.startswith("#"):
                    found.append((start, cmd))
                start = None
    text = prose(text)
    for m in _INLINE.finditer(text):
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


def simple_commands(command: str) -> list[list[str]]:
    """A command line split at &&, ||, ;, | into argv lists, comments, leading
    VAR=value assignments and `...` (an elision) dropped."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    argvs, argv = [], []
    for token in lex:
        if token in _OPERATORS:
            argvs.append(argv)
            argv = []
        elif token != "...":
            argv.append(token)
    argvs.append(argv)
    out = []
    for argv in argvs:
        while argv and _ENV.match(argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def _extras() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def check_command(argv: list[str]) -> str | None:
    """What is wrong with one documented command, or None. Commands of other tools pass."""
    prog = pathlib.PurePosixPath(argv[0]).name
    if prog == "qkern":
        from qkern.cli import build_parser

        err = io.StringIO()
        try:   # --help prints and exits 0
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                build_parser().parse_args(argv[1:])
        except SystemExit as exit_:
            return f"qkern's parser rejects it: {err.getvalue().strip()}" if exit_.code else None
        return None
    if prog in ("python", "python3"):
        args = [a for a in argv[1:] if a not in ("-u", "-O", "-B")]
        if args[:1] == ["-m"] and len(args) > 1:
            module = args[1]
            return None if importlib.util.find_spec(module) else f"no module {module}"
        if args and args[0].endswith(".py") and not (ROOT / args[0]).is_file():
            return f"no file {args[0]}"
        return None
    if prog == "pytest":
        for arg in argv[1:]:   # the paths among the arguments
            path = arg.split("::")[0]
            if ("/" in path or path.endswith(".py")) and not (ROOT / path).exists():
                return f"no path {arg}"
        return None
    if prog in ("pip", "pip3") and argv[1:2] == ["install"]:
        for arg in argv[2:]:
            m = re.fullmatch(r"(?:\.|qkern)\[([^\]]*)\]", arg)
            missing = m and set(m.group(1).split(",")) - _extras()
            if missing:
                return f"pyproject.toml has no extra {', '.join(sorted(missing))}"
        return None
    return None


# --------------------------------------------------------------------------------------
# links and repository paths
# --------------------------------------------------------------------------------------


def prose(text: str) -> str:
    """The page with its fenced blocks blanked out, line numbers kept."""
    lines = text.split("\n")
    for block in blocks(text):
        lines[block.line - 2:block.end] = [""] * (block.end - block.line + 2)
    return "\n".join(lines)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the page's headings."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6} +(.*?) *#*$", prose(text), flags=re.M)}


def broken_links(page: str) -> list[str]:
    """Relative Markdown links whose file, or heading anchor, does not exist."""
    path = ROOT / page
    text = prose(path.read_text())
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):   # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = path.parent / file if file else path
        where = f"{page}:{text.count(chr(10), 0, m.start()) + 1}: ({target})"
        if not dest.exists():
            bad.append(f"{where}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{where}: no heading with anchor #{anchor}")
    return bad


_REPO_PATH = re.compile(r"(?<![\w/.-])((?:qkern|tests|bench|docs|\.ci)/[\w./-]*\w)(?![\w<])")


def missing_paths(page: str) -> list[str]:
    """Paths into this repository (qkern/..., tests/..., bench/..., docs/...) that the page
    names and that do not exist."""
    text = prose((ROOT / page).read_text())
    return [f"{page}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)}"
            for m in _REPO_PATH.finditer(text) if not (ROOT / m.group(1)).exists()]


# --------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------


def test_every_page_is_found_and_linked_from_the_readme():
    found = pages()
    for page in ["README.md", "docs/api.md", "docs/formats.md", "docs/kernels.md",
                 "docs/models.md", "docs/qlora.md", "docs/gptq.md"]:
        assert page in found
    readme = (ROOT / "README.md").read_text()
    unlinked = [p for p in found[1:] if f"]({p})" not in readme]
    assert not unlinked, f"README's Documentation section does not link {unlinked}"


@pytest.mark.parametrize("page", pages())
def test_page_runs(page):
    run_page(page)


@pytest.mark.parametrize("page", pages())
def test_fences_name_a_known_language_and_templates_say_why(page):
    for block in blocks((ROOT / page).read_text()):
        where = f"{page}:{block.line}"
        assert block.info in {PYTHON} | SHELLS | NOT_RUN, (
            f"{where}: fence info {block.info!r}: use python (run), bash/sh/console, text, "
            f"json or nothing; mark python that cannot run with a first line '{TEMPLATE} why'")
        if block.info == PYTHON and block.template is not None:
            assert block.template, f"{where}: a template says why it is not run"


@pytest.mark.parametrize("page", pages())
def test_commands_shown_are_valid(page):
    bad = []
    for line, command in commands((ROOT / page).read_text()):
        for argv in simple_commands(command):
            problem = check_command(argv)
            if problem:
                bad.append(f"{page}:{line}: {' '.join(argv)}: {problem}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", pages())
def test_links_and_paths_exist(page):
    bad = broken_links(page) + missing_paths(page)
    assert not bad, "\n".join(bad)


# the runner itself must be able to fail, and must skip exactly the templates

_SAMPLE = """\
Text.

```python
x = 1
def f(a: int): return a
assert f.__annotations__["a"] is int    # none of the runner's __future__ imports
```

- a list item:

  ```python
  y = x + 1          # indented fence: dedented and run, same namespace
  ```

```python
# template: needs mypackage, which you write
import mypackage
```

```bash
qkern bench --m 1,16
```
"""


def test_runner_runs_blocks_in_order_and_skips_templates():
    assert [b.info for b in blocks(_SAMPLE)] == ["python", "python", "python", "bash"]
    assert [b.template for b in python_blocks(_SAMPLE)] == [None, None,
                                                           "needs mypackage, which you write"]
    assert run_page("docs/sample.md", _SAMPLE) == 2


def test_runner_fails_on_a_failing_block_that_is_not_a_template():
    text = _SAMPLE.replace("# template: needs mypackage, which you write\n", "")
    with pytest.raises(ModuleNotFoundError) as info:
        run_page("docs/sample.md", text)
    assert "docs/sample.md: python block 2 (line 16) failed" in "".join(info.value.__notes__)
    with pytest.raises(SyntaxError):   # templates are compiled
        run_page("docs/sample.md", _SAMPLE.replace("import mypackage", "import my package"))


def test_link_and_path_checks_can_fail(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "qkern").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Top\n## How fast, today\n```text\n# not a heading\n```\n"
        "[ok](#how-fast-today) [ok](../qkern) [no](#not-a-heading) [no](b.md) "
        "[web](https://example.com/x.md)\nSee `qkern/` and qkern/nothing.py.\n")
    assert [b.split(": ", 1)[1] for b in broken_links("docs/a.md")] == [
        "(#not-a-heading): no heading with anchor #not-a-heading", "(b.md): no file docs/b.md"]
    assert missing_paths("docs/a.md") == ["docs/a.md:7: qkern/nothing.py"]


def test_command_checks_can_fail():
    assert check_command(["qkern", "bench", "--m", "1,16"]) is None
    assert check_command(["qkern", "bench", "--formats", "int9"]) is not None
    assert check_command(["qkern", "tune", "--no-such-option"]) is not None
    assert check_command(["python", "bench/no_such_script.py"]) is not None
    assert check_command(["pytest", "-n", "auto", "bench/nothing/"]) == "no path bench/nothing/"
    assert check_command(["python", "-m", "qkern._no_such_module"]) is not None
    assert check_command(["pip", "install", "qkern[no_such_extra]"]) is not None
    assert check_command(["pip", "install", "-e", ".[test,models]"]) is None
    assert simple_commands("A=1 qkern info && pip install x  # note") == [
        ["qkern", "info"], ["pip", "install", "x"]]
    assert commands("Run `qkern bench --m 1`.\n\n```console\n$ qkern info\n```\n") == [
        (4, "qkern info"), (1, "qkern bench --m 1")]
