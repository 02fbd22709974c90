"""How well does each per-example score find the mislabeled training examples?

``memloc.detect(run_or_scores, *, is_noisy=None)`` (command: ``python -m memloc detect RUN``) reads
the ``"scores"`` result of a run (:mod:`memloc.scores`) and the run's ``is_noisy`` mask and, for
every score, ranks examples by ``direction * score`` (higher =
flagged as noisy) and reports

* ``auroc``: area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`; 0.5 = chance);
* ``ap``: average precision (:func:`sklearn.metrics.average_precision_score`; chance = base rate);
* ``prec_at_k``: precision among the top k, k = the number of noisy examples (so it equals recall
  at k); ties at the cut are shared out in expectation (a random order within the tie), so
  integer scores such as forgetting counts are not favoured by an arbitrary order.

Each score is evaluated on the examples where it is defined (finite); a score defined on a subset
only (neuron_count: the flip sample) reports that subset's size and noise rate (the AP chance
level). When some score is partial, every score is evaluated again on the *common* subset (the
examples where all scores are defined) so they can be compared on the same examples.

A language model's run (its scores of sequences, :mod:`memloc.analyses.scores.tasks`) is read the same
way, its memorisation targets (``is_noisy`` of its ``run.h5``: noisy, backdoor, canary and duplicate
sequences) in the role of the noisy examples.

Returns the ``"detect"`` result: ``values`` (score, metric), ``direction``, ``size``, ``noisy``,
``base_rate`` (score); when a score is partial also ``common_values`` (score, metric) and
``common_example``. The report draws the ROC / precision-recall curves (:func:`plot_curves`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics as skm
import xarray as xr

from ..core.deprecation import renamed
from ..core.errors import MemlocError
from ..core.results import Result
from ..core.run import as_run
from ..core.runtime import atomic_path, split_list
from ..core.prerequisites import needed_result
from ..core.run import load
from ..core.figures import figure, table, coord_names
from ..core.schemas import Schema, Var
from ..core.registry import Analysis, Command

__all__ = ["auroc", "average_precision", "precision_at_k", "METRICS", "detection_metrics",
           "detection_table", "format_table", "plot_curves", "detect"]


def _binary(is_noisy) -> np.ndarray:
    return np.asarray(is_noisy, dtype=bool)


def auroc(score: np.ndarray, is_noisy: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` (higher = noisy) for ``is_noisy``; NaN if one class only."""
    y = _binary(is_noisy)
    return float(skm.roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def average_precision(score: np.ndarray, is_noisy: np.ndarray) -> float:
    """Average precision of ``score`` (higher = noisy); NaN without noisy examples."""
    y = _binary(is_noisy)
    return float(skm.average_precision_score(y, score)) if y.any() else float("nan")


def precision_at_k(score: np.ndarray, is_noisy: np.ndarray, k: int | None = None) -> float:
    """Precision of the ``k`` highest scores (default k = number of noisy examples).

    Examples tied with the k-th score are taken in expectation over a random order of the tie:
    the remaining places are filled at the tie's noise rate. NaN if k = 0.
    """
    score, y = np.asarray(score, dtype=np.float64), _binary(is_noisy)
    k = int(y.sum()) if k is None else int(k)
    if k <= 0 or k > len(y):
        return float("nan")
    cut = np.sort(score)[::-1][k - 1]
    above, tied = score > cut, score == cut
    return float((y[above].sum() + (k - above.sum()) * y[tied].mean()) / k)


METRICS = {"auroc": auroc, "ap": average_precision, "prec_at_k": precision_at_k}


def detection_metrics(score: np.ndarray, is_noisy: np.ndarray, *, direction: int = 1) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one score over its finite entries.

    Returns ``{metric: value, "size": n, "noisy": noisy count, "base_rate": noisy / n}``.
    """
    if direction not in (1, -1):
        raise MemlocError(f"direction must be +1 or -1, got {direction!r}", argument="direction")
    score, y = np.asarray(score, dtype=np.float64), _binary(is_noisy)
    if score.shape != y.shape:
        raise ValueError(f"score {score.shape} and is_noisy {y.shape} differ in shape")
    ok = np.isfinite(score)
    s, y = direction * score[ok], y[ok]
    out = {name: fn(s, y) if len(y) else float("nan") for name, fn in METRICS.items()}
    out.update(size=int(len(y)), noisy=int(y.sum()), base_rate=float(y.mean()) if len(y) else float("nan"))
    return out


def detection_table(scores: dict[str, np.ndarray], is_noisy: np.ndarray, directions: dict[str, int],
                    *, rows: np.ndarray | None = None) -> dict:
    """Metrics of every score, restricted to ``rows`` (bool mask or ids; default all examples).

    Returns ``{"names": [S], "metrics": [M], "values": (S, M), "size", "noisy", "base_rate": (S,)}``.
    """
    names = list(scores)
    y = _binary(is_noisy)
    sel = np.arange(len(y)) if rows is None else np.asarray(rows)
    per = [detection_metrics(np.asarray(scores[n])[sel], y[sel], direction=int(directions[n])) for n in names]
    return {"names": names, "metrics": list(METRICS),
            "values": np.array([[p[m] for m in METRICS] for p in per], dtype=np.float64).reshape(len(names), len(METRICS)),
            **{k: np.array([p[k] for p in per]) for k in ("size", "noisy", "base_rate")},
            "direction": np.array([int(directions[n]) for n in names])}


def format_table(table: dict, *, markdown: bool = False) -> str:
    """The table as aligned text (or a Markdown table)."""
    head = ["score", "dir", "n", "noisy", "base rate", "AUROC", "AP", "prec@k"]
    lines = []
    for i, name in enumerate(table["names"]):
        lines.append([name, f"{table['direction'][i]:+d}", str(table["size"][i]), str(table["noisy"][i]),
                      f"{table['base_rate'][i]:.3f}", *("-" if np.isnan(v) else f"{v:.3f}" for v in table["values"][i])])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if j == 0 else "---:" for j in range(len(head))) + "|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in lines])
    widths = [max(len(r[j]) for r in [head, *lines]) for j in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), *map(fmt, lines)])


def plot_curves(scores: dict[str, np.ndarray], is_noisy: np.ndarray, directions: dict[str, int], path, *,
                title: str = "") -> None:
    """ROC and precision-recall curves of every score (over its finite entries) to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    y_all = _binary(is_noisy)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, score in scores.items():
        score = np.asarray(score, dtype=np.float64)
        ok = np.isfinite(score)
        s, y = directions[name] * score[ok], y_all[ok]
        if not 0 < y.sum() < len(y):
            continue
        fpr, tpr, _ = skm.roc_curve(y, s)
        prec, rec, _ = skm.precision_recall_curve(y, s)
        partial = "" if ok.all() else f", n={ok.sum()}"
        ax_roc.plot(fpr, tpr, label=f"{name} ({auroc(s, y):.3f}{partial})")
        ax_pr.plot(rec, prec, label=f"{name} ({average_precision(s, y):.3f}{partial})")
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax_roc.set(xlabel="false positive rate (clean flagged)", ylabel="true positive rate (noisy found)",
               title="ROC (legend: AUROC)")
    ax_pr.axhline(y_all.mean(), color="grey", lw=0.8, ls="--")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (legend: AP)", ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def _noisy_mask(is_noisy) -> np.ndarray:
    """``is_noisy`` as a (N,) bool mask: booleans or 0 / 1 (NaN or 0.5 would silently read as True)."""
    v = np.asarray(is_noisy)
    if v.ndim != 1 or v.dtype.kind not in "biuf" or not np.isin(v, (0, 1)).all():
        raise MemlocError(f"is_noisy must be a (N,) mask of booleans (or 0 / 1), got {type(is_noisy).__name__} of "
                          f"shape {v.shape}", argument="is_noisy")
    return v.astype(bool)


@renamed(names="methods")
def detect(source, *, methods="all", is_noisy=None) -> Result:
    """Detection quality of every stored score against the known noise.

    ``source``: a :class:`memloc.Run` / run path (its ``"scores"`` result and ``is_noisy``), or a
    ``"scores"`` :class:`memloc.Result` with ``is_noisy`` (N,). ``methods``: scores to evaluate
    (default all). Returns the ``"detect"`` result.
    """
    if isinstance(source, Result):
        if source.name != "scores" or is_noisy is None:
            raise MemlocError("detect needs a run, or a 'scores' result together with is_noisy")
        res, noisy = source, _noisy_mask(is_noisy)
    else:
        run = as_run(source, need_checkpoints=False)
        res, noisy = needed_result(run, "scores"), run.is_noisy if is_noisy is None else _noisy_mask(is_noisy)
    index = res["example"].values
    if not np.array_equal(index, np.arange(len(noisy))):
        raise MemlocError(f"the scores do not list the {len(noisy)} training examples in order")
    values = {k: res[k].values for k in res.data_vars}
    if methods not in (None, "all"):
        wanted = split_list(methods)
        bad = [n for n in wanted if n not in values]
        if bad or not wanted:
            raise MemlocError(f"score {', '.join(map(repr, bad)) or '(none given)'} not among the stored scores; "
                              f"available: {', '.join(values)}", argument="methods")
        values = {n: values[n] for n in wanted}
    if not values:
        raise MemlocError("the scores result holds no scores")
    directions = {n: int(res[n].attrs["direction"]) for n in values}
    rows = np.flatnonzero(np.logical_and.reduce([np.isfinite(v) for v in values.values()]))
    own = detection_table(values, noisy, directions)
    data = {"values": (("score", "metric"), own["values"]), "direction": ("score", own["direction"]),
            **{k: ("score", own[k]) for k in ("size", "noisy", "base_rate")}}
    if len(rows) < len(noisy):
        data["common_values"] = (("score", "metric"), detection_table(values, noisy, directions, rows=rows)["values"])
        data["common_example"] = ("common", rows.astype(np.int64))
    ds = xr.Dataset(data, coords={"score": own["names"], "metric": own["metrics"]})
    return Result("detect", ds, config={"scores": own["names"], "metrics": own["metrics"],
                                        "noise_rate": float(noisy.mean())})


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--scores", default="all", help="comma-separated score names to evaluate, or 'all'")


def _cli_execute(args):
    return detect(load(args.run), methods=args.scores)


def _cli_table(res, values, size, noisy):
    n = res.sizes["score"]
    size, noisy = np.broadcast_to(size, n), np.broadcast_to(noisy, n)
    return {"names": list(res["score"].values), "direction": res["direction"].values, "size": size,
            "noisy": noisy, "base_rate": noisy / np.maximum(size, 1), "values": values}


def _what(run) -> tuple[str, str]:
    """What the run's noisy examples and examples are called: its labels, or a language model's sequences."""
    return ("memorisation targets", "sequences") if run.is_lm else ("noisy labels", "examples")


def _cli_summary(res, args):
    targets, examples = _what(load(args.run))
    text = (f"noise detection ({int(res['noisy'].max())} {targets}); each score over the {examples} where it is "
            f"defined:\n" + format_table(_cli_table(res, res["values"].values, res["size"].values, res["noisy"].values)))
    size, noisy = res["size"].values, res["noisy"].values
    unmeasured = [f"{n} ({size[i]} {examples}, {noisy[i]} noisy)" for i, n in enumerate(res["score"].values)
                  if not 0 < noisy[i] < size[i]]
    if unmeasured:     # no ranking to measure on examples of one kind (e.g. a flip that searched no noisy example)
        text += "\n- = not measured: the examples a score is defined on must include noisy and clean ones: " + \
            ", ".join(unmeasured)
    if "common_values" in res:
        rows = res["common_example"].values
        noisy = int(load(args.run).is_noisy[rows].sum())
        text += f"\n\nevery score on the {len(rows)} {examples} where all are defined ({noisy} noisy)" + (
            ":\n" + format_table(_cli_table(res, res["common_values"].values, len(rows), noisy))
            if 0 < noisy < len(rows) else ": not measured (they must include noisy and clean ones)")
    return text


def plot_detect(res, out, run=None) -> str:
    """The detection table of every score and its ROC / precision-recall curves (from the run's scores)."""
    names, metrics = coord_names(res, "score"), coord_names(res, "metric")
    values, size = res["values"].values, res["size"].values
    text = "## Noise detection\n\nHow well each per-example score ranks the noisy examples first.\n\n"
    if run is not None and run.results_path("scores").is_file():
        sc = run.result("scores")
        kept = [n for n in names if n in sc]
        plot_curves({n: sc[n].values for n in kept}, run.is_noisy, {n: int(sc[n].attrs["direction"]) for n in kept},
                    out / "detect_roc.png",
                    title=f"{run.path.name}: {int(run.is_noisy.sum())} of {run.num_train} "
                          + ("sequences memorisation targets" if run.is_lm else "labels noisy"))
        text += figure("detection curves", "detect_roc.png", "left, the ROC curve of each score for ranking the "
                       "wrongly labelled examples first (the closer to the top left, the better; the dashed diagonal "
                       "is chance; AUROC in the legend); right, precision against recall (the dashed line is the "
                       "share of wrong labels, a random ranking's precision).") + "\n\n"
    measured = ~np.isnan(values).all(axis=1)     # a score on examples of one kind only has no detection to show
    rows = [[n] + [float(v) for v in values[i]] + [int(size[i])] for i, n in enumerate(names) if measured[i]]
    if rows:
        text += table(["score"] + metrics + ["examples"], rows)
    noisy = res["noisy"].values
    skipped = [f"`{n}` ({int(size[i])} examples, {int(noisy[i])} noisy)" for i, n in enumerate(names) if not measured[i]]
    if skipped:
        text += ("\n\nNot measured (the examples a score is defined on must include noisy and clean ones): "
                 + ", ".join(skipped) + ".")
    return text


ANALYSIS = Analysis(
    name="detect", order=70, compute=detect,
    plot=plot_detect,
    schema=Schema("detect", "how well each score finds the mislabeled examples (memloc.detect)",
                  {"score": Var(("score",), "score name"), "metric": Var(("metric",), "auroc, ap, prec_at_k")},
                  {"values": Var(("score", "metric"), "each score over the examples where it is defined"),
                   "direction": Var(("score",), "+1 / -1 (see scores)"),
                   "size": Var(("score",), "examples where the score is defined"),
                   "noisy": Var(("score",), "noisy examples among them"),
                   "base_rate": Var(("score",), "noisy / size (the AP of chance)"),
                   "common_values": Var(("score", "metric"), "every score on the examples where all are defined", optional=True),
                   "common_example": Var(("common",), "ids of those examples", optional=True)}),
    command=Command(name="detect", group="finding", example="memloc detect RUN",
                    help='noise detection metrics (AUROC, AP, precision@k) of every score',
                    device=False,
                    description="Noise-detection quality (AUROC, average precision, precision at the true noise rate) of every "
                                "score in RUN/results/scores.h5; writes RUN/results/detect.h5 (the report draws the ROC curves).",
                    flags={"methods": "--scores"},
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
