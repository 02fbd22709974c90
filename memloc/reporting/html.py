"""``report.html``: the report as one self-contained page (figures embedded as base64 PNG, no outside
reference), rendered from the same Markdown as ``report.md``.

The Markdown is the small subset the report sections write (:mod:`memloc.core.figures`): headings,
paragraphs, ``- `` lists, pipe tables, images ``![alt](file.png)`` followed by their ``*How to read:
...*`` paragraph (the figure's caption), inline ``code``, ``**bold**`` and ``*italic*``.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

__all__ = ["to_html"]

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1.5em; color: #1f2328; line-height: 1.5; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
code { background: #f3f4f6; padding: .1em .3em; border-radius: 4px; font-size: 90%; }
table { border-collapse: collapse; margin: 1em 0; font-size: 92%; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f8fa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 92%; margin-top: .4em; }
.findings { background: #f0f7ff; border: 1px solid #b6d4fe; border-radius: 6px; padding: .6em 1.4em; }
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, body = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _image(alt: str, name: str, folder: Path) -> str:
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def to_html(markdown: str, folder: Path, title: str) -> str:
    """The page for report Markdown whose figures are files in ``folder``."""
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", markdown) if b.strip()]
    body, i = [], 0
    while i < len(blocks):
        block = blocks[i]
        lines = block.splitlines()
        image = _IMAGE.match(block.strip())
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            heading = block.lstrip("#").strip()
            body.append(f"<h{level}>{_inline(heading)}</h{level}>")
            if heading == "Findings" and i + 1 < len(blocks) and blocks[i + 1].startswith("- "):
                i += 1
                items = re.split(r"\n(?=- )", blocks[i])
                body.append('<ul class="findings">' + "".join(f"<li>{_inline(it[2:].strip())}</li>" for it in items)
                            + "</ul>")
        elif image:
            caption = ""
            if i + 1 < len(blocks) and blocks[i + 1].startswith("*How to read:"):
                i += 1
                caption = f"<figcaption>{_inline(blocks[i].strip().strip('*'))}</figcaption>"
            body.append(f"<figure>{_image(image.group(1), image.group(2), folder)}{caption}</figure>")
        elif all(line.startswith("|") for line in lines) and len(lines) >= 2:
            body.append(_table(lines))
        elif block.startswith("- "):
            items = re.split(r"\n(?=- )", block)
            body.append("<ul>" + "".join(f"<li>{_inline(it[2:].strip())}</li>" for it in items) + "</ul>")
        else:
            body.append(f"<p>{_inline(' '.join(lines))}</p>")
        i += 1
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
