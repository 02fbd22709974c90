"""Figures (PNG) for every result of a run, ``report.md`` tying them together, and the same as one
self-contained ``report.html`` (figures embedded).

``memloc.report(run, out=None)`` (command: ``python -m memloc report RUN [--out DIR]``; default
``RUN/report``). Each analysis declares the function that draws its section from its result object
(``plot=``, :mod:`memloc.core.registry`); results the run does not have are skipped. The report opens
with the findings its results support (:mod:`.summary`) and ends with the run's settings (those set).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core import registry
from ..core.errors import MemlocError
from ..core.figures import table
from ..core.run import as_run
from ..core.runtime import atomic_path, progress
from .summary import findings
from .html import to_html
from .plots import plot_training

__all__ = ["report", "plotters"]


def plotters() -> dict:
    """Result name -> the function drawing its report section, for every analysis that has one (in order)."""
    declared = (registry.analysis(name) for name in registry.analyses())
    return {a.name: a.plot for a in declared if a.plot is not None}


def report(source, out=None, *, results: dict | None = None) -> Path:
    """Write every available figure, ``report.md`` and ``report.html`` for a run; returns the Markdown path.

    ``source``: a :class:`memloc.Run` or run path (a run of a custom model works: the report reads
    only the run's dynamics and its results). ``results``: result objects to draw instead of (or
    besides) the saved ones, ``{name: Result}``.
    """
    run = as_run(source)       # a run without checkpoints is an error before anything is written
    out = Path(out) if out is not None else run.path / "report"
    if out.exists() and not out.is_dir():
        raise MemlocError(f"output folder {str(out)!r} is a file", argument="out")
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(run.config)
    if "model" not in settings:      # recorded by the user's loop (Recorder, a Trainer callback): what its writer knew
        model = run.info.get("model") or {}
        settings["model"] = model.get("spec") or str(model.get("class") or "").rsplit(".", 1)[-1]
        settings.setdefault("data", run.info.get("data") or run.info.get("sequence_set"))
    if not settings.get("etd_after"):   # dropout settings mean nothing without dropout layers
        settings = {k: v for k, v in settings.items() if k not in ("etd_after", "etd_kind", "p_gen", "p_mem")}
    settings = {k: v for k, v in settings.items() if not (v is None or v is False or v in ("", [], {}))}
    given = dict(results or {})
    drawn, found = [plot_training(run, out)], {}
    for name, plot in progress(list(plotters().items()), desc="report", unit="figure"):
        res = given.get(name)
        if res is None and run.results_path(name).exists():
            res = run.result(name)
        if res is not None:
            found[name] = res
            drawn.append(plot(res, out, run))
    summary = findings(run, found)
    sections = [f"# memloc report: `{run.path.name}`",
                "## Findings\n\n" + "\n".join(f"- {line}" for line in summary),
                *drawn,
                "## Settings\n\nThe options of the run that are set:\n\n"
                + table(["setting", "value"], [[k, json.dumps(v)] for k, v in sorted(settings.items())])]
    text = "\n\n".join(sections) + "\n"
    md = out / "report.md"
    with atomic_path(md) as tmp:
        tmp.write_text(text)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(to_html(text, out, f"memloc report: {run.path.name}"))
    return md
