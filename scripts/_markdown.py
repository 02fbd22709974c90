"""Shared tail of the experiment scripts: print the tables and write them as Markdown."""
import time
from pathlib import Path


def finish(lines: list[str], started: float, markdown: str | None) -> str:
    """Append the total time, print the text, write it to ``markdown`` when given; returns it."""
    text = "\n".join([*lines, f"\nTotal time: {time.time() - started:.0f} s."]) + "\n"
    print(text)
    if markdown:
        Path(markdown).write_text(text)
    return text


def add_common(p, runs_dir: str) -> None:
    """The options every experiment script shares: where runs live, parallel jobs, device, Markdown output."""
    p.add_argument("--runs-dir", default=runs_dir, help="where the runs are written (and reused)")
    p.add_argument("--jobs", type=int, default=1, help="trainings in parallel (processes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--markdown", default=None, help="write the tables to this Markdown file")
