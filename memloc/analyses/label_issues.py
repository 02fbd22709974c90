"""Label issues without ground truth: every training example ranked, the suspects flagged.

``memloc.find_label_issues(run_or_runs, *, method="combined")`` (command: ``python -m memloc issues
RUN``) ranks every training example by a suspicion score and flags the top ``n`` where ``n`` =
round(estimated noise rate x N). Nothing here reads ``is_noisy``: it works on real data.

**The noise-rate estimate** is the calibrated confident joint of confident learning (Northcutt
et al. 2021, as in cleanlab) computed on the softmax of the checkpoint of epoch k (the EL2N
epoch, :func:`memloc.analyses.scores.default_epoch_k`: 10% of training): early in training the model has
learned the clean patterns but not yet memorised the wrong labels, so its predictions play the role
of cleanlab's out-of-sample probabilities without K extra trainings. Per class j the threshold t_j
is the mean p_j over examples labelled j; an example counts for (given i, predicted j) when some
p_j >= t_j (j the most probable of those); the counts are calibrated row-wise to the label counts
and the off-diagonal mass over N is the rate. Measured on MNIST-5k (symmetric noise 10 / 20 /
40%, 3 seeds each): MLP 10.3 / 20.2 / 40.6%, lenet 12.0 / 22.6 / 45.9%; a noise-free MLP run:
1.2% (``artifacts/label_issues.md``). A two-component Gaussian mixture on -log(mean early confidence) did much worse on the
same runs (17.7 / 24.0 / 29.8 / 44.3%: the clean component is far from Gaussian), so it is not
offered. ``rate=`` sets the rate by hand.

**The ranking** (``method``): any score of :mod:`memloc.scores`, or ``combined`` (default): the mean of
the rank percentiles of confidence, EL2N and AUM (each turned so that high = suspicious), the
three strongest detectors on the MNIST-5k runs (``artifacts/detect_mnist5k.md``). With several
runs of the same data (different seeds), each score and the epoch-k probabilities are averaged over
the runs first (Data Diet averages its scores over 10 runs). The ranking score must score every
example: one that covers only some (``neuron_count``: the examples flip searched; a score of a
Recorder run that did not present every example) is refused with the count it covers, since the
examples it leaves out would be ranked, and flagged, in an arbitrary order (compare scores on the
examples they cover with :mod:`memloc.detect`).

The ``"issues"`` result: per example ``rank`` (1 = most suspicious), ``flagged``, ``label_given``,
``label_predicted`` (argmax of the epoch-k probabilities: the relabelling candidate), ``suspicion``
and every score; ``rate_estimate``. ``to_csv(result, path)`` writes the ranked table.

The same estimate, ranking and flags from plain arrays (labels, probabilities, scores), without a
run: :mod:`memloc.analyses.arrays` (``memloc.estimate_noise_rate``, ``memloc.find_label_issues_in_arrays``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ..core.deprecation import renamed
from ..core.errors import MemlocError
from ..core.evaluate import evaluate
from ..core.precision import autocast, check_precision, laid_out
from ..core.results import Result
from ..core.run import Run, as_run
from ..core.sequences import not_classifier
from ..core.runtime import check_range, resolve_device
from .arrays import COMBINED, estimate_noise_rate, find_label_issues_in_arrays, flag_top, suspicion
from .scores import SCORES, default_epoch_k, scores as compute_scores
from ..core.run import load
from ..core.options import add_precision, check_writable, nonnegative_int, number, positive_int
from ..core.figures import figure, plt, save_figure, table
from ..core.schemas import Schema, Var, EXAMPLE_VAR
from ..core.registry import Analysis, Command
from ..core.store import stored

__all__ = ["COMBINED", "ISSUE_SCORES", "confident_joint_rate", "suspicion", "same_data_runs",
           "find_label_issues", "flag_top", "flag_quality", "to_csv"]

ISSUE_SCORES = ("confidence", "el2n", "aum", "variability", "forgetting", "final_loss")   # cheap: dynamics + one pass


def confident_joint_rate(probs: np.ndarray, given: np.ndarray) -> float:
    """Noise rate from the calibrated confident joint of ``probs`` (N, C) and given labels (N,):
    :func:`memloc.analyses.arrays.estimate_noise_rate`, its error naming the checkpoint."""
    if not np.isfinite(np.asarray(probs, dtype=np.float64)).all():
        raise MemlocError("the probabilities behind the noise-rate estimate are not finite (a diverged checkpoint?); "
                          "choose another checkpoint", argument="checkpoint")
    return estimate_noise_rate(given, probs)


def flag_quality(flagged, is_noisy) -> dict[str, float]:
    """Precision and recall of a flagged set against a known noise mask (NaN where undefined)."""
    flagged, is_noisy = np.asarray(flagged, dtype=bool), np.asarray(is_noisy, dtype=bool)
    hit = float((flagged & is_noisy).sum())
    return {"precision": hit / flagged.sum() if flagged.any() else float("nan"),
            "recall": hit / is_noisy.sum() if is_noisy.any() else float("nan")}


def same_data_runs(runs) -> list[Run]:
    """Runs (or one run) as a list, checked to train on the same examples with the same labels."""
    runs = [as_run(r) for r in (runs if isinstance(runs, (list, tuple)) else [runs])]
    if not runs:
        raise MemlocError("give at least one run", argument="runs")
    lm = next((r for r in runs if r.is_lm), None)
    if lm is not None:      # its scores exist, but it has no labels to flag
        raise not_classifier(f"{str(lm.path)!r} is a language model's run (no labels)")
    first = runs[0]
    for r in runs[1:]:
        if r.num_train != first.num_train or not np.array_equal(r.label_given, first.label_given):
            raise MemlocError(f"runs {str(first.path)!r} and {str(r.path)!r} do not train on the same examples and "
                              "labels; scores can only be averaged over runs of the same data", argument="runs")
    return runs


def _check_covered(table: dict[str, np.ndarray], method: str) -> None:
    """Refuse a ranking score that leaves examples without a value (NaN): they cannot be ranked."""
    for name in COMBINED if method == "combined" else (method,):
        n, scored = len(table[name]), int(np.isfinite(table[name]).sum())
        if scored < n:
            which = " (the examples flip searched)" if name == "neuron_count" else ""
            raise MemlocError(f"method {method!r}: {name} scores {scored} of {n} examples{which}; label issues rank every "
                              "training example, and the unscored ones would be flagged in an arbitrary order: rank by "
                              "a score of every example (combined, el2n, confidence, ...), or compare scores on the "
                              "examples they cover with memloc detect", argument="method")


def _probabilities(run: Run, epoch: int, device, batch_size: int, precision: str = "fp32") -> np.ndarray:
    train = run.data(device).train
    with autocast(precision, device):
        logits = evaluate(laid_out(run.model(epoch, device=device), precision, device), train.batches(batch_size),
                          logits=True)["logits"]
    return torch.from_numpy(logits).softmax(1).numpy()


@renamed(runs="source", by="method", checkpoint_k="checkpoint", batch_size="eval_batch_size")
@stored('issues')
def find_label_issues(source, *, method: str = "combined", checkpoint: int | None = None, rate: float | None = None,
                      device="auto", eval_batch_size: int = 1024, precision: str = "fp32") -> Result:
    """Every training example of ``source`` (one run, or runs of the same data) ranked; the suspects flagged.

    ``method``: ``combined`` or a score name of :data:`memloc.analyses.scores.SCORES`. ``checkpoint``: the
    epoch of EL2N and of the probabilities behind the rate estimate and the predicted labels
    (default 10% of training). ``rate``: flag this fraction instead of estimating it.

    Every example is ranked, so the ranking score (for ``combined``: each of its scores) must score
    every example; a partial one (``neuron_count`` scores only the examples flip searched) is refused,
    naming how many examples it scores, rather than flag the unscored ones in an arbitrary order.

    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``): the forward passes of the probabilities and of the
    scores under autocast, as :func:`memloc.scores` runs them (:mod:`memloc.core.precision`).
    """
    runs = same_data_runs(source)
    if method != "combined" and (not isinstance(method, str) or method not in SCORES):
        raise MemlocError(f"method {method!r} is not a score; valid: combined, {', '.join(SCORES)}", argument="method")
    if rate is not None:
        rate = check_range("rate", rate, low=0, high=1, high_open=True)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    check_precision(precision)
    final = min(r.final_epoch for r in runs)
    k = default_epoch_k(final) if checkpoint is None else checkpoint
    k = check_range("checkpoint", k, low=0, high=final, integer=True)
    if k == 0:
        raise MemlocError("checkpoint 0 is the untrained initialisation: its predictions say nothing about the "
                          "labels (the noise-rate estimate from them flags nearly every example); choose an epoch "
                          f"in 1..{final} (default: {default_epoch_k(final)})", argument="checkpoint")
    dev = resolve_device(device)
    check_precision(precision, dev)
    names = list(dict.fromkeys([*ISSUE_SCORES, *([method] if method != "combined" else [])]))
    per_run = [compute_scores(r, methods=names, checkpoint=k, device=dev, precision=precision) for r in runs]
    table = {n: np.mean([res[n].values for res in per_run], axis=0) for n in names}
    _check_covered(table, method)
    probs = np.mean([_probabilities(r, k, dev, eval_batch_size, precision) for r in runs], axis=0)
    given = runs[0].label_given
    rate_est = confident_joint_rate(probs, given) if rate is None else float(rate)
    issues = find_label_issues_in_arrays(given, probs, rate=rate_est, scores=table, by=method)
    count = int(issues["is_label_issue"].sum())
    n = len(given)
    ds = xr.Dataset(
        {"rank": ("example", issues["rank"].to_numpy()),
         "flagged": ("example", issues["is_label_issue"].to_numpy().astype(np.int8)),
         **{v: ("example", issues[v].to_numpy()) for v in ("label_given", "label_predicted", "prob_given",
                                                           "suspicion")},
         "scores": (("example", "score"), np.stack([table[s] for s in names], axis=1)),
         "direction": ("score", np.array([SCORES[s].direction for s in names])),
         "rate_estimate": ((), rate_est)},
        coords={"example": np.arange(n), "score": names})
    config = {"by": method, "checkpoint_k": int(k), "rate": rate, "rate_method": "confident_joint" if rate is None else "given",
              "runs": [str(r.path) for r in runs], "flagged": count, "device": str(dev),
              "precision": precision}
    return Result("issues", ds, config=config)


def to_csv(result: Result, path) -> Path:
    """The ranked table (one row per example, most suspicious first) as CSV, written atomically."""
    from ..core.runtime import atomic_path
    df = result.to_dataframe()
    scores = result["scores"].to_pandas()
    df = df.drop(columns=[c for c in df.columns if c not in ("rank", "flagged", "label_given", "label_predicted",
                                                             "prob_given", "suspicion")])
    df = df.join(scores).sort_values("rank")
    df.index.name = "id"
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            df.to_csv(tmp, float_format="%.6g")
    except OSError as e:
        raise MemlocError(f"cannot write {str(path)!r} ({e.strerror or e})", argument="csv") from None
    return path


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--by", default="combined",
                   help=f"ranking: combined (mean rank percentile of {', '.join(COMBINED)}) or one score: "
                        f"{', '.join(n for n in SCORES if n != 'neuron_count')}")
    p.add_argument("--also", nargs="+", default=[], metavar="RUN2",
                   help="more runs of the same data (other seeds): scores and probabilities averaged over all runs")
    p.add_argument("--rate", type=number(float, 0, 1, high_open=True), default=None,
                   help="flag this fraction instead of the estimated noise rate")
    p.add_argument("--checkpoint-k", type=nonnegative_int, default=None,
                   help="epoch of the predictions and of EL2N (default: 10%% of training, at least 1)")
    p.add_argument("--out", dest="csv", default=None, metavar="CSV",
                   help="also write the ranked table (one row per example, most suspicious first) as CSV")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="examples per forward pass")
    add_precision(p, what="the forward passes of the probabilities and of el2n")


def _cli_execute(args):
    if args.csv:
        check_writable(args.csv)
    return find_label_issues([args.run, *args.also], method=args.by, rate=args.rate, checkpoint=args.checkpoint_k,
                             device=args.device, eval_batch_size=args.batch_size, precision=args.precision)


def _cli_after_save(res, args):
    if args.csv:
        to_csv(res, args.csv)


def _cli_summary(res, args):
    n, flagged = res.sizes["example"], int(res["flagged"].sum())
    rate = float(res["rate_estimate"])
    lines = [f"estimated noise rate {rate:.4f} ({res.config['rate_method']}, epoch {res.config['checkpoint_k']}"
             f"{', %d runs' % len(res.config['runs']) if len(res.config['runs']) > 1 else ''}): "
             f"{flagged} of {n} examples flagged (ranked by {res.config['by']})"]
    run = load(args.run)
    if run.is_noisy.any():
        q = flag_quality(res["flagged"].values, run.is_noisy)
        lines.append(f"against the run's known noise ({int(run.is_noisy.sum())} = {run.is_noisy.mean():.4f}): "
                     f"precision {q['precision']:.3f}, recall {q['recall']:.3f}")
    top = np.argsort(res["rank"].values)[:5]
    lines.append("most suspicious: " + ", ".join(
        f"#{i} (given {int(res['label_given'][i])}, predicted {int(res['label_predicted'][i])})" for i in top))
    if args.csv:
        lines.append(f"wrote {args.csv}")
    return "\n".join(lines)


def plot_issues(res, out, run=None) -> str:
    """Suspicion histogram (flagged vs not; noisy vs clean when the run knows), the most suspicious examples."""
    susp, flagged = res["suspicion"].values, res["flagged"].values.astype(bool)
    rate, n = float(res["rate_estimate"]), len(susp)
    known = run is not None and run.is_noisy.any() and len(run.is_noisy) == n
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bins = np.linspace(np.nanmin(susp), np.nanmax(susp), 50)
    if known:
        for rows, color, label in ((~run.is_noisy, "tab:blue", "clean (truth)"), (run.is_noisy, "tab:red", "noisy (truth)")):
            ax.hist(susp[rows], bins=bins, histtype="step", lw=1.5, color=color, label=label)
    else:
        ax.hist(susp, bins=bins, color="tab:gray", label="all examples")
    cut = susp[flagged].min() if flagged.any() else np.nanmax(susp)
    ax.axvline(cut, color="k", ls="--", lw=1, label=f"flag threshold ({flagged.sum()} flagged)")
    ax.set(xlabel=f"suspicion ({res.config.get('by', '')})", ylabel="examples", yscale="log",
           title=f"label issues: estimated noise rate {rate:.1%}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    name = save_figure(fig, out, "issues.png")
    text = (f"## Label issues (no ground truth used)\n\nEstimated noise rate {rate:.2%} "
            f"({res.config.get('rate_method')}, epoch {res.config.get('checkpoint_k')}); the {flagged.sum()} most "
            f"suspicious of {n} examples are flagged (ranking: {res.config.get('by')}).")
    if known:
        hit = (flagged & run.is_noisy).sum()
        text += (f" Against the run's known noise ({run.is_noisy.mean():.2%}): precision "
                 f"{hit / max(flagged.sum(), 1):.3f}, recall {hit / run.is_noisy.sum():.3f}.")
    top = np.argsort(res["rank"].values)[:10]
    rows = [[int(i), int(res["label_given"][i]), int(res["label_predicted"][i]), float(res["prob_given"][i]),
             float(susp[i])] for i in top]
    how = ("how many examples (log scale) have each suspicion, the clean and the noisy ones by the run's ground "
           "truth as two outlines (not stacked)" if known else "how many examples (log scale) have each suspicion")
    return (text + "\n\n" + figure("issues", name, how + "; the examples right of the dashed line are flagged.")
            + "\n\nMost suspicious examples:\n\n"
            + table(["example", "given", "predicted", "p(given)", "suspicion"], rows) + _thumbnails(res, run, top, out))


def _thumbnails(res, run, ids, out) -> str:
    """The most suspicious training images with their given and predicted labels (image runs whose data
    can be rebuilt; nothing otherwise)."""
    if run is None or run.is_lm or not len(ids):
        return ""
    try:
        x = run.data("cpu").train.x[np.asarray(ids)]
    except MemlocError:               # a run recorded without a data spec: no images to show
        return ""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        return ""
    fig, axes = plt.subplots(1, len(ids), figsize=(1.3 * len(ids), 1.7), squeeze=False)
    for ax, i, img in zip(axes[0], ids, x):
        img = (img - img.min()) / max(img.max() - img.min(), 1e-12)        # each image to [0, 1]
        ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray")
        ax.set_title(f"#{int(i)}\n{int(res['label_given'][i])} -> {int(res['label_predicted'][i])}", fontsize=8)
        ax.axis("off")
    name = save_figure(fig, out, "issues_examples.png")
    return "\n\n" + figure("most suspicious examples", name, "the most suspicious training images, each titled with "
                             "its id and 'given label -> label the early model predicts': look at them to judge "
                             "whether the given label is wrong.")


ANALYSIS = Analysis(
    name="issues", order=80, compute=find_label_issues,
    plot=plot_issues,
    schema=Schema("issues", "every training example ranked by suspicion, the suspects flagged, no ground truth used "
                  "(memloc.find_label_issues)",
                  {**EXAMPLE_VAR, "score": Var(("score",), "score name (memloc.scores)")},
                  {"rank": Var(("example",), "1 = most suspicious"),
                   "flagged": Var(("example",), "1 = among the round(rate_estimate x N) most suspicious"),
                   "label_given": Var(("example",), "label trained on"),
                   "label_predicted": Var(("example",), "argmax of the epoch-k probabilities (averaged over runs): the relabelling candidate"),
                   "prob_given": Var(("example",), "epoch-k probability of the given label"),
                   "suspicion": Var(("example",), "the ranking value (higher = more suspicious)"),
                   "scores": Var(("example", "score"), "every score, raw (averaged over runs)"),
                   "direction": Var(("score",), "+1: higher = more likely mislabeled, -1: lower is"),
                   "rate_estimate": Var((), "estimated noise rate (calibrated confident joint) or the rate given")}),
    command=Command(name="issues", group="finding", example="memloc issues RUN",
                    help='rank every example by how likely its label is wrong; flag the suspects (no ground truth)',
                    description="Rank every training example by how likely its label is wrong and flag the suspects, without ground "
                                "truth: the number flagged is the noise rate estimated by confident learning's calibrated confident "
                                "joint on the early-epoch (epoch k) predictions. Writes RUN/results/issues.h5 (and --out CSV).",
                    flags={"runs": "--also", "csv": "--out", "method": "--by", "checkpoint": "--checkpoint-k",
                           "eval_batch_size": "--batch-size"},
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    after_save=_cli_after_save,
                    execute=_cli_execute),
)
