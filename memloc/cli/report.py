"""``memloc report RUN``: figures, report.md and report.html for every result of a run (:func:`memloc.report`)."""
from pathlib import Path

from ..core.errors import MemlocError
from ..core.registry import Command
from ..reporting import report


def arguments(p):
    p.add_argument("--out", default=None, help="output folder (default RUN/report)")


def execute(args):
    out = Path(args.out) if args.out is not None else Path(args.run) / "report"
    if (out / "report.md").exists() and not args.overwrite:
        raise MemlocError(f"{str(out / 'report.md')!r} exists; use {{overwrite}} to replace it",
                          options={"overwrite": True})
    return report(args.run, out)


def summary(md, args):
    return f"report: {md}\n        {md.with_name('report.html')} (one page, figures embedded)"


COMMAND = Command(
    name="report", group="reporting", example="memloc report RUN", order=160,
    help="figures and a summary page for every result of a run",
    description="Figures (PNG) for every result file of a run, a report.md summary and the same as one "
                "self-contained report.html (figures embedded), each opening with the findings its results support.",
    arguments=arguments, execute=execute, summary=summary, device=False, overwrite=True,
    overwrite_help="replace an existing report in the output folder")
