"""Cleaning: drop (or relabel) the flagged examples, retrain with the same recipe, compare.

``memloc.clean(run, method="combined")`` (command: ``python -m memloc clean RUN``) flags label issues
with :func:`memloc.find_label_issues` (no ground truth), trains fresh runs on the cleaned training
set (``relabel=True``: flagged examples keep their place with the epoch-k prediction as their
label) for several seeds, and compares their test accuracy with runs on all the data. The
baseline is cleanlab, the field's standard tool: ``cleanlab.filter.find_label_issues`` on
out-of-sample probabilities from K-fold cross-validation with the same recipe (K extra trainings
on (K-1)/K of the data), cleaned and retrained the same way. Where ground truth exists the
flagged sets' precision and recall and the noise left after cleaning are recorded too.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..scale.distributed import alone, world
from ..core.errors import MemlocError
from ..core.evaluate import evaluate
from ..core.precision import autocast, check_precision, laid_out
from ..analyses.label_issues import find_label_issues, flag_quality
from ..core.results import Result
from ..core.run import as_run
from ..core.runtime import check_flag, check_range, resolve_device
from .children import check_seeds, parent_config, save_array, subset_config, train_children
from ..analyses.label_issues import COMBINED
from ..analyses.scores import SCORES
from ..core.options import add_experiment, number, seed_table
from ..core.figures import figure, plt, save_figure, table, mean_se_axis, plus_minus
from ..core.schemas import Schema, Var
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored

__all__ = ["clean", "cleanlab_flags", "cleaned_config"]


def cleaned_config(parent, base: dict, flagged: np.ndarray, *, relabel: bool, predicted: np.ndarray | None,
                   seed: int, stem: str) -> dict:
    """The child config of a cleaned training set: flagged examples dropped, or relabelled."""
    if not relabel:
        return {**subset_config(base, np.flatnonzero(~flagged), len(flagged)), "seed": seed}
    if base.get("subset") is not None:
        raise MemlocError("relabel needs a run trained on its whole training set (this one was trained on a subset); "
                          "drop the flagged examples instead", argument="relabel")
    given = np.where(flagged, predicted, parent.label_given).astype(np.int64)
    path = save_array(parent, f"labels-{stem}", given)
    return {**base, "noise": 0.0, "labels": path, "seed": seed}


def cleanlab_flags(parent, base: dict, *, folds: int = 5, jobs: int = 1, device="cpu",
                   batch_size: int = 1024, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's issues from K-fold out-of-sample probabilities of the parent's recipe (their forward
    passes in ``precision``).

    Returns (flagged (N,) bool, out-of-sample probabilities (N, C)). Folds are stratified by the
    given label and seeded with the parent's seed.
    """
    from cleanlab.filter import find_label_issues as cl_find
    from sklearn.model_selection import StratifiedKFold
    folds = check_range("folds", folds, low=2, integer=True)
    given = parent.label_given
    counts = np.bincount(given)
    if counts[counts > 0].min() < folds:
        raise MemlocError(f"a class has fewer than {folds} examples: use fewer folds", argument="folds")
    split = StratifiedKFold(folds, shuffle=True, random_state=base["seed"]).split(np.zeros(len(given)), given)
    held = [test for _, test in split]
    children = [(f"cv{folds}-fold{f}", subset_config(base, np.setdiff1d(np.arange(len(given)), rows), len(given)))
                for f, rows in enumerate(held)]
    runs = train_children(parent, children, jobs=jobs, device=device, desc=f"cleanlab {folds}-fold")
    data = parent.data(device)
    probs = np.zeros((len(given), data.num_classes))
    for rows, child in zip(held, runs):
        part = data.train.subset(rows)
        with autocast(precision, device):
            logits = evaluate(laid_out(child.model(device=device), precision, device), part.batches(batch_size),
                              logits=True)["logits"]
        probs[rows] = torch.from_numpy(logits).softmax(1).numpy()
    return np.asarray(cl_find(labels=given, pred_probs=probs), dtype=bool), probs


@renamed(run="source", by="method")
@stored('clean')
def clean(source, *, method: str = "combined", relabel: bool = False, seeds=(0, 1, 2), baseline: bool = True,
          folds: int = 5, jobs: int = 1, device="auto", precision: str = "fp32") -> Result | None:
    """The ``"clean"`` result: test accuracy per method (all, memloc, cleanlab) and seed. Under torchrun
    the fresh runs (and the cleanlab folds) are split across the processes
    (:mod:`memloc.actions.children`) and rank 0 returns the result, the other ranks None.
    ``precision``: of the flags' passes (:func:`memloc.find_label_issues`, the cleanlab folds' probabilities;
    :mod:`memloc.core.precision`); the fresh runs train with the parent's recipe, in its precision."""
    check_precision(precision)
    run = as_run(source)
    base = parent_config(run)
    seeds = check_seeds(seeds)
    relabel, baseline = check_flag("relabel", relabel), check_flag("baseline", baseline)
    folds = check_range("folds", folds, low=2, integer=True)
    jobs = check_range("jobs", jobs, low=1, integer=True)
    if baseline:        # before any work, not after the flags' passes (it was an ImportError traceback there)
        try:
            import cleanlab.filter  # noqa: F401
        except ImportError:
            raise MemlocError("the cleanlab baseline needs the cleanlab package: install it (pip install cleanlab) "
                              "or leave the baseline out", argument="baseline") from None
    dev = resolve_device(device)
    check_precision(precision, dev)
    with alone():       # under torchrun every rank flags alone; the children are split (train_children)
        issues = find_label_issues(run, method=method, device=dev, precision=precision)
    flags = {"memloc": issues["flagged"].values.astype(bool)}
    predicted = {"memloc": issues["label_predicted"].values}
    if baseline:
        flags["cleanlab"], probs = cleanlab_flags(run, base, folds=folds, jobs=jobs, device=dev,
                                                     precision=precision)
        predicted["cleanlab"] = probs.argmax(1)
    for name, f in flags.items():
        if f.all():
            raise MemlocError(f"{name} flags every example: nothing left to train on", argument="method")
    methods = ["all", *flags]
    children = [(f"all-s{s}", {**base, "seed": s}) for s in seeds]
    for name, f in flags.items():
        children += [(f"clean-{name}-{'relabel' if relabel else 'drop'}-s{s}",
                      cleaned_config(run, base, f, relabel=relabel, predicted=predicted[name], seed=s, stem=name))
                     for s in seeds]
    runs = train_children(run, children, jobs=jobs, device=dev, desc="clean")
    if world()[0] > 0:
        return None             # rank 0 evaluates and returns the result
    acc = np.array([float(r.metrics()["test_accuracy"][-1]) for r in runs]).reshape(len(methods), len(seeds))
    known = bool(run.is_noisy.any())
    quality = {m: flag_quality(f, run.is_noisy) if known else {"precision": np.nan, "recall": np.nan}
               for m, f in flags.items()}
    left = {"all": run.is_noisy.mean() if known else np.nan}
    for m, f in flags.items():
        if not known:
            left[m] = np.nan
        elif relabel:
            left[m] = float(np.mean(np.where(f, predicted[m], run.label_given) != run.label_true))
        else:
            left[m] = float(run.is_noisy[~f].mean())
    ds = xr.Dataset(
        {"test_accuracy": (("flags", "seed"), acc),
         "flagged": ("flags", np.array([0, *(int(f.sum()) for f in flags.values())])),
         "precision": ("flags", np.array([np.nan, *(quality[m]["precision"] for m in flags)])),
         "recall": ("flags", np.array([np.nan, *(quality[m]["recall"] for m in flags)])),
         "noise_left": ("flags", np.array([left[m] for m in methods]))},
        coords={"flags": methods, "seed": seeds})
    config = {"by": method, "relabel": relabel, "seeds": seeds, "baseline": baseline, "folds": folds, "jobs": jobs,
              "rate_estimate": float(issues["rate_estimate"]), "checkpoint_k": issues.config["checkpoint_k"],
              "device": str(dev), "precision": precision}
    return Result("clean", ds, config=config)


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--by", default="combined",
                   help=f"ranking of the flags: combined ({', '.join(COMBINED)}) or a score: "
                        f"{', '.join(n for n in SCORES if n != 'neuron_count')}")
    p.add_argument("--relabel", action="store_true",
                   help="give flagged examples the predicted label instead of dropping them")
    p.add_argument("--no-cleanlab", dest="baseline", action="store_false",
                   help="skip the cleanlab baseline (it costs --folds extra trainings)")
    p.add_argument("--folds", type=number(int, 2), default=5, help="cross-validation folds of the cleanlab baseline")
    add_experiment(p)


def _cli_execute(args):
    return clean(args.run, method=args.by, relabel=args.relabel, seeds=args.seeds, baseline=args.baseline,
                 folds=args.folds, jobs=args.jobs, device=args.device, precision=args.precision)


def _cli_summary(res, args):
    lines = [f"test accuracy (mean +- s.e. over {res.sizes['seed']} seed(s); flagged examples "
             f"{'relabelled' if res.config['relabel'] else 'dropped'}):", seed_table(res, dim="flags")]
    for m in res["flags"].values[1:]:
        r = res.sel(flags=m)
        extra = ""
        if np.isfinite(float(r["precision"])):
            extra = (f", precision {float(r['precision']):.3f}, recall {float(r['recall']):.3f}, noise left "
                     f"{float(r['noise_left']):.4f} (was {float(res['noise_left'].sel(flags='all')):.4f})")
        lines.append(f"{m}: {int(r['flagged'])} flagged{extra}")
    return "\n".join(lines)


def plot_clean(res, out, run=None) -> str:
    """Test accuracy per cleaning (all data, memloc, cleanlab), with flags' precision / recall."""
    flags = [str(f) for f in res["flags"].values]
    mean, se = mean_se_axis(res["test_accuracy"].values)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    seeds = res.sizes["seed"]
    bars = ax.bar(flags, 100 * mean, yerr=100 * se if seeds > 1 else None, capsize=4,
                  color=["tab:gray", "tab:blue", "tab:orange"][:len(flags)])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 105),
           title=f"cleaning: flagged examples {'relabelled' if res.config.get('relabel') else 'dropped'}")
    name = save_figure(fig, out, "clean.png")
    rows = [[f, plus_minus(mean[i], se[i], res.sizes["seed"], digits=2), int(res["flagged"].values[i]),
             float(res["precision"].values[i]), float(res["recall"].values[i]), float(res["noise_left"].values[i])]
            for i, f in enumerate(flags)]
    baseline = ("; cleanlab (K-fold cross-validation, same recipe) is the baseline." if "cleanlab" in flags
                else " (no cleanlab baseline in this result).")
    return ("## Cleaning\n\nRetrained with the run's recipe on the cleaned training set"
            f"{baseline}\n\n"
            + figure("clean", name, "test accuracy of fresh runs trained on all the data and on the data "
                     "without each method's flagged examples" + ("; error bars are standard errors over the "
                     f"{res.sizes['seed']} seeds." if res.sizes["seed"] > 1 else " (one seed: no error bars).")) + "\n\n"
            + table(["flags", "test accuracy (%)", "flagged", "precision", "recall", "noise left"], rows))


ANALYSIS = Analysis(
    name="clean", order=100, compute=clean,
    plot=plot_clean,
    schema=Schema("clean", "drop (or relabel) flagged examples and retrain: test accuracy before / after (memloc.clean)",
                  {"flags": Var(("flags",), "all (no cleaning), memloc (find_label_issues flags), cleanlab (baseline)"),
                   "seed": Var(("seed",), "training seed")},
                  {"test_accuracy": Var(("flags", "seed"), "final test accuracy"),
                   "flagged": Var(("flags",), "examples flagged"),
                   "precision": Var(("flags",), "flagged that are noisy (NaN without ground truth)"),
                   "recall": Var(("flags",), "noisy that are flagged (NaN without ground truth)"),
                   "noise_left": Var(("flags",), "share of the training set still mislabeled after cleaning (NaN without ground truth)")}),
    command=Command(name="clean", group="acting", example="memloc clean RUN --seeds 0 --no-cleanlab", flags={"method": "--by"},
                    help='drop or relabel the flagged examples and retrain; cleanlab as the baseline',
                    sharded=True,
                    description="Flag label issues without ground truth (memloc issues), drop them (or --relabel them with the early "
                                "model's prediction), train fresh runs with the run's recipe and compare test accuracy with training "
                                "on all the data; cleanlab on K-fold out-of-sample probabilities of the same recipe is the baseline. "
                                "Writes RUN/results/clean.h5; fresh runs live under RUN/children.",
                    interrupted="finished runs under RUN/children are kept; rerun the same command to go on",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
