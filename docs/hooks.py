"""mkdocs hooks: the parts of the site generated at build time from the code and artifacts/.

Placeholders a page may hold (each on its own line):

* ``<!-- memloc:schemas -->``: every result file's variables, from the schemas the analyses declare
  (:func:`memloc.core.registry.markdown`);
* ``<!-- memloc:help NAME -->``: ``memloc NAME --help`` as the command line prints it;
* ``<!-- memloc:commands -->``: every command with its one-line help and example, by group (``memloc --help``'s);
* ``<!-- memloc:api -->``: one mkdocstrings entry per name of the public face (``memloc.<name>``);
* ``<!-- memloc:include artifacts/FILE.md -->``: a measured table of ``artifacts/``, its headings moved
  below the page's and its links made relative to the page.

Every file of ``artifacts/`` (tables and figures) is also served at ``artifacts/`` on the site, read
from the repository at build time (nothing is copied into ``docs/``).
"""
from __future__ import annotations

import os
import posixpath
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import memloc  # noqa: E402  (now: the memloc of this checkout, not another one installed in editable mode)

if Path(memloc.__file__).resolve().parent != ROOT / "memloc":
    raise ImportError(f"docs/hooks.py documents {ROOT / 'memloc'} but imported {memloc.__file__}")

_PLACEHOLDER = re.compile(r"^<!-- memloc:(\w+)(?: (\S+))? -->$", re.M)
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def on_files(files, config):
    """Serve artifacts/ (tables and figures) at artifacts/ on the site."""
    from mkdocs.structure.files import File
    for path in sorted((ROOT / "artifacts").rglob("*")):
        if path.is_file() and path.suffix in (".md", ".png", ".json"):
            files.append(File(path.relative_to(ROOT).as_posix(), str(ROOT), config["site_dir"],
                              config["use_directory_urls"]))
    return files


_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html, page, config, files):
    """Docstrings are written with Sphinx roles (:func:`x`): keep the code, drop the role's name."""
    return _ROLE.sub("", html)


def on_page_markdown(markdown, page, config, files):
    return _PLACEHOLDER.sub(lambda m: _expand(m.group(1), m.group(2), page.file.src_uri), markdown)


def _expand(kind: str, arg: str | None, page: str) -> str:
    if kind == "schemas":
        from memloc.core.registry import markdown
        return markdown()
    if kind == "help":
        return "```text\n" + command_help(arg).rstrip() + "\n```"
    if kind == "commands":
        from memloc.core.registry import GROUPS, examples, grouped
        ex = examples()
        rows = [f"| {f'**{group}** ({GROUPS[group]})' if i == 0 else ''} | [`{name}`](../how-to/{name}.md) | {text} | "
                f"{f'`{ex[name]}`' if ex.get(name) else ''} |"
                for group, names in grouped().items() for i, (name, text) in enumerate(names.items())]
        return "| stage | command | what it does | example |\n|---|---|---|---|\n" + "\n".join(rows)
    if kind == "api":
        return api_reference()
    if kind == "include":
        return include(arg, page)
    raise ValueError(f"unknown placeholder memloc:{kind} in {page}")


def command_help(name: str) -> str:
    """``memloc NAME --help`` (80 columns)."""
    from memloc.cli.runner import parser
    from memloc.core.registry import command
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser(command(name)).format_help()
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


#: the public face grouped for the API page: heading -> the _FACE modules it holds
GROUPS = {
    "Runs, data and models": ("memloc.core.",),
    "Training": ("memloc.training.",),
    "Analyses": ("memloc.analyses.",),
    "Actions": ("memloc.actions.",),
    "Reports": ("memloc.reporting",),
}


def api_reference() -> str:
    out = []
    for heading, prefixes in GROUPS.items():
        names = [n for n, mod in memloc._FACE.items() if mod.startswith(prefixes)]
        out.append(f"## {heading}\n")
        for name in names:
            out.append(f"::: {memloc._FACE[name]}.{name}\n    options:\n      heading: memloc.{name}\n")
    return "\n".join(out)


def include(rel: str, page: str) -> str:
    """An artifacts/ Markdown file inside a page: headings two levels down, links relative to the page."""
    path = ROOT / rel
    text = path.read_text()
    here = posixpath.dirname(page)
    base = posixpath.dirname(rel)

    def relink(m):
        target = m.group(2)
        if re.match(r"^([a-z]+:|#|/)", target):
            return m.group(0)
        return m.group(1) + posixpath.relpath(posixpath.normpath(posixpath.join(base, target)), here or ".") + m.group(3)

    text = re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + 2) + " ", text, flags=re.M)
    return _LINK.sub(relink, text)
