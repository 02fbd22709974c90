"""The documentation: the site builds with ``mkdocs build --strict``, and every code block of the
README and of docs/ runs as written.

* ```` ```python ```` blocks: the blocks of one page are one program, run in order in one namespace
  (a tutorial may split its program over several blocks), in a fresh empty working folder (so
  ``runs/mine`` is created there), in this process (imports paid once). A block that fails fails
  its page's test, and the traceback names the Markdown file and line.
* A python block that another test runs says so on the line before its fence:
  ``<!-- example: NAME (tests/test_x.py runs it) -->``; it is skipped here and that test file must
  mention ``example: NAME`` or call ``run_readme_example("NAME", ...)`` (conftest.py).
* ```` ```bash ```` blocks are not run; every ``memloc ...`` / ``python -m memloc ...`` /
  ``torchrun ... -m memloc ...`` line in them is parsed by that command's own parser (an unknown
  command or option fails), and every ``python scripts/X.py`` names a script that exists.

Budget: the executed blocks are sized to take ~30 s in all on 2 CPU cores (each page trains its own
tiny run on scikit-learn's digits).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_RUN_ELSEWHERE = re.compile(r"<!-- example: (\S+) \((tests/\S+) runs it\) -->\s*$")


def blocks(path: Path, lang: str):
    """(line of the first code line, code, marker or None) of every ```lang block of a Markdown file."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _RUN_ELSEWHERE.search(before)
        out.append((text.count("\n", 0, m.start()) + 2, m.group(2), marker.groups() if marker else None))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


PYTHON_PAGES = [p for p in PAGES if any(m is None for _, _, m in blocks(p, "python"))]


@pytest.mark.slow       # each page trains a tiny run: 10-20 s on 2 busy cores
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_rel)
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch):
    import matplotlib
    import torch
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # tiny models: one thread is fastest (two spin-wait on two busy cores)
    namespace = {"__name__": "__docs__"}
    try:
        for line, code, marker in blocks(page, "python"):
            if marker is None:     # padded so that a traceback's line number is the Markdown file's
                exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_blocks_run_elsewhere_are_run_there():
    found = [(p, m) for p in PAGES for _, _, m in blocks(p, "python") if m is not None]
    for page, (name, test) in found:
        assert (ROOT / test).is_file(), f"{_rel(page)}: {test} does not exist"
        text = (ROOT / test).read_text()
        assert f"example: {name}" in text or f'_example("{name}"' in text, \
            f"{_rel(page)}: {test} does not run example {name!r}"


def _command_lines(code: str):
    """Shell command lines of a block, continuation lines joined and comments dropped."""
    for raw in code.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield from (part.strip() for part in re.split(r"&&|;", line) if part.strip())


def _memloc_argv(words: list[str]) -> list[str] | None:
    """The memloc arguments of a command line, or None when it does not run memloc."""
    if words[:1] == ["memloc"]:
        return words[1:]
    if "-m" in words and words[0] in ("python", "torchrun"):
        i = words.index("-m")
        if words[i + 1:i + 2] == ["memloc"]:       # torchrun drops a "--" that ends its own options
            return words[i + 2 + (words[0] == "torchrun" and words[i + 2:i + 3] == ["--"]):]
        if words[i + 1].startswith("memloc."):
            return [words[i + 1].split(".", 1)[1], *words[i + 2:]]
    return None


BASH_BLOCKS = [(p, line, code) for p in PAGES for line, code, _ in blocks(p, "bash")]


@pytest.mark.parametrize("page,line,code", BASH_BLOCKS, ids=[f"{_rel(p)}:{n}" for p, n, _ in BASH_BLOCKS])
def test_every_memloc_command_in_a_shell_block_parses(page, line, code):
    from memloc.cli.runner import parser
    from memloc.core.registry import command, commands
    for cmd in _command_lines(code):
        words = [w for w in shlex.split(cmd) if w != "..."]    # "..." stands for options given before
        if words[:2] == ["python", "scripts"] or (words[:1] == ["python"] and words[1:2] and words[1].startswith("scripts/")):
            assert (ROOT / words[1]).is_file(), f"{_rel(page)}:{line}: {words[1]} does not exist"
            continue
        argv = _memloc_argv(words)
        if argv is None:
            continue
        where = f"{_rel(page)}:{line}: {cmd}"
        if not argv or argv[0] in ("-h", "--help"):
            continue
        assert argv[0] in commands(), f"{where}: unknown command {argv[0]!r}"
        try:
            parser(command(argv[0])).parse_args(argv[1:])
        except SystemExit as exit:
            if exit.code:
                pytest.fail(f"{where}: does not parse")


@pytest.mark.slow       # ~15 s: mkdocstrings reads every public module
def test_docs_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: no broken link, anchor or reference; the generated pages build."""
    if shutil.which("mkdocs") is None and not _importable("mkdocs"):
        pytest.skip('mkdocs is not installed (pip install -e ".[docs]")')
    for plugin in ("material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if not _importable(plugin):
            pytest.skip(f'{plugin} is not installed (pip install -e ".[docs]")')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "results" / "index.html").is_file()
    results = (tmp_path / "site" / "reference" / "results" / "index.html").read_text()
    assert "results/flip.h5" in results and "neuron_count" in results


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_the_flags_named_differently_in_the_library_are_all_listed():
    """how-to/index.md lists every command flag whose word is not an argument of the command's function
    (issue 26: `--scores` / `methods=` and the like), and lists no flag a command lacks."""
    import inspect

    import memloc
    from memloc.cli.runner import parser
    from memloc.core.registry import command, commands
    text = (ROOT / "docs/how-to/index.md").read_text()
    listed = set()
    for row in re.findall(r"^\| (`[^|]+) \| ([^|]*) \| [^|]+ \|$", text, re.M):
        for name in re.findall(r"`([\w-]+)`", row[0]):
            listed |= {(name, flag) for flag in re.findall(r"`(--[\w-]+)", row[1])}
    functions = {"issues": "find_label_issues", "dropout": "evaluate_dropout"}
    common = {"--device", "--overwrite", "--stream", "--workers", "--precision", "--help", "--out"}
    differ = set()
    for name in set(commands()) - {"train", "demo"}:
        params = inspect.signature(getattr(memloc, functions.get(name, name.replace("-", "_")))).parameters
        flags = [max(a.option_strings, key=len) for a in parser(command(name))._actions if a.option_strings]
        differ |= {(name, f) for f in flags if f not in common and f[2:].replace("-", "_") not in params}
        assert not {f for n, f in listed if n == name} - set(flags), f"{name}: the table lists a flag it lacks"
    assert listed == differ, f"missing from the table: {sorted(differ - listed)}; not different: {sorted(listed - differ)}"
