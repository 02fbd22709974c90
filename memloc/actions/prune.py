"""Data pruning: keep a fraction of the training set chosen by a score, train afresh, measure.

``memloc.prune(run, methods=["el2n", "grand", "forgetting"], keep=[0.9, 0.7, 0.5, 0.3])`` (command:
``python -m memloc prune RUN``) scores the parent run's examples, keeps a fraction of them per
score and mode, trains a fresh run on each kept set with the parent's recipe (several seeds) and
records the final test accuracy, with random pruning as the reference and the full set as the
ceiling. As in Data Diet (Paul et al. 2021), GraNd is taken at initialisation (``grand_checkpoint``)
and EL2N at an early epoch k; forgetting counts (Toneva et al. 2019) at the end of training.

Modes (which examples are **kept**; scores turned by their direction so high = hard / suspicious):
``hardest`` (Data Diet's and Toneva's choice: drop the easiest), ``easiest``, ``window`` (skip the
``offset`` hardest fraction, then keep the next ones: under label noise the hardest examples are
mostly mislabeled, and Data Diet finds the best window shifts away from them) and ``random``.
Ties (forgetting counts are integers) are broken by a seeded permutation.
"""
from __future__ import annotations

import os

import numpy as np
import xarray as xr

from ..scale.distributed import alone, world
from ..core.errors import MemlocError
from ..core.precision import check_precision
from ..core.results import Result
from ..core.run import Run, as_run
from ..core.sequences import not_classifier
from ..core.runtime import check_choices, check_range, resolve_device, split_list
from ..analyses.scores import SCORES, default_epoch_k, scores as compute_scores
from .children import check_seeds, parent_config, subset_config, train_children
from ..core.options import add_experiment, mean_se, nonnegative_int, number
from ..core.figures import figure, plt, save_figure, table, mean_se_axis, plus_minus
from ..core.schemas import Schema, Var
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored

__all__ = ["MODES", "kept_ids", "prune", "prune_values"]

MODES = ("hardest", "easiest", "window")


def kept_ids(values: np.ndarray, keep: float, *, mode: str = "hardest", offset: float = 0.0,
             seed: int = 0) -> np.ndarray:
    """Sorted ids of the examples kept: ``round(keep x N)`` of them by ``values`` (higher = harder)
    in ``mode`` (:data:`MODES` or ``random``: a uniform draw with ``seed``)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    keep = check_range("keep", keep, low=0, high=1, low_open=True)
    count = max(1, int(round(keep * n)))
    rng = np.random.default_rng(seed)
    if mode == "random":
        return np.sort(rng.choice(n, size=count, replace=False))
    if mode not in MODES:
        raise MemlocError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}, random", argument="mode")
    if not np.isfinite(v).all():
        raise MemlocError(f"the pruning score is defined for {int(np.isfinite(v).sum())} of {n} examples only; "
                          "pruning ranks every example", argument="by")
    order = np.lexsort((rng.permutation(n), -v))          # hardest first, ties in a seeded random order
    if mode == "hardest":
        rows = order[:count]
    elif mode == "easiest":
        rows = order[n - count:]
    else:
        offset = check_range("offset", offset, low=0, high=1, high_open=True)
        start = min(int(round(offset * n)), n - count)
        rows = order[start:start + count]
    return np.sort(rows)


def prune_values(runs, names, *, checkpoint=None, grand_checkpoint: int = 0, device="cpu",
                 precision: str = "fp32") -> dict[str, np.ndarray]:
    """``direction x score`` (higher = harder) of every named score, averaged over ``runs`` (one run
    or runs of the same data; Data Diet averages 10): GraNd at ``grand_checkpoint`` (Data Diet:
    initialisation), EL2N at ``checkpoint`` (default 10% of training), the others as
    :func:`memloc.scores` computes them (in ``precision``)."""
    from ..analyses.label_issues import same_data_runs
    runs = same_data_runs(runs)
    k = default_epoch_k(min(r.final_epoch for r in runs)) if checkpoint is None else checkpoint
    out = {}
    for name in names:
        epoch = grand_checkpoint if name == "grand" else k
        out[name] = SCORES[name].direction * np.mean(
            [compute_scores(r, methods=[name], checkpoint=epoch, device=device, precision=precision)[name].values
             for r in runs], axis=0)
    return out


def _fraction(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MemlocError(f"keep fractions must be numbers in (0, 1], got {value!r}", argument="keep") from None


@renamed(run="source", by="methods", checkpoint_k="checkpoint", grand_epoch="grand_checkpoint")
@stored('prune')
def prune(source, *, methods=("el2n", "grand", "forgetting"), keep=(0.9, 0.7, 0.5, 0.3), mode: str = "hardest",
          offset: float = 0.1, seeds=(0, 1, 2), checkpoint: int | None = None, grand_checkpoint: int = 0,
          also=(), jobs: int = 1, device="auto", precision: str = "fp32") -> Result | None:
    """The ``"prune"`` result: test accuracy of fresh runs on kept subsets, per score (and random),
    keep fraction and seed; with the share of noisy examples kept. ``also``: more runs of the same
    data whose scores are averaged with ``source``'s (the fresh runs use its recipe). ``checkpoint``: the epoch
    of EL2N (default 10% of training); ``grand_checkpoint``: the epoch of GraNd (Data Diet: 0, initialisation). Under torchrun
    the fresh runs are split across the processes (:mod:`memloc.actions.children`) and rank 0
    returns the result, the other ranks None. ``precision``: of the scores' passes (:func:`memloc.scores`;
    :mod:`memloc.core.precision`); the fresh runs train with the parent's recipe, in its precision."""
    check_precision(precision)
    run = as_run(source)
    also = [also] if isinstance(also, (str, os.PathLike, Run)) else also
    if not isinstance(also, (list, tuple)) or not all(isinstance(r, (str, os.PathLike, Run)) for r in also):
        raise MemlocError("also must be a list of runs or run paths", argument="also")
    also = [as_run(r) for r in also]
    offset = check_range("offset", offset, low=0, high=1, high_open=True)
    jobs = check_range("jobs", jobs, low=1, integer=True)
    lm = next((r for r in (run, *also) if r.is_lm), None)
    if lm is not None:      # its scores exist, but pruning retrains image runs on the kept examples
        raise not_classifier(f"{str(lm.path)!r} is a language model's run")
    base = parent_config(run)
    names = check_choices("methods", methods, [n for n in SCORES if n != "neuron_count"], "pruning score")
    keeps = [_fraction(k) for k in (keep if isinstance(keep, (list, tuple)) else split_list(keep) or [])]
    keeps = [check_range("keep", k, low=0, high=1, low_open=True) for k in keeps]
    seeds = check_seeds(seeds)
    if not keeps:
        raise MemlocError("give at least one keep fraction", argument="keep")
    if mode not in MODES:
        raise MemlocError(f"unknown mode {mode!r}; valid: {', '.join(MODES)} (random is always run as the reference)",
                          argument="mode")
    grand_checkpoint = check_range("grand_checkpoint", grand_checkpoint, low=0, high=run.final_epoch, integer=True)
    dev = resolve_device(device)
    check_precision(precision, dev)
    with alone():       # under torchrun every rank scores alone; the children are split (train_children)
        values = prune_values([run, *also], names, checkpoint=checkpoint, grand_checkpoint=grand_checkpoint, device=dev,
                              precision=precision)
    compared = [*names, "random"]
    label = lambda m, k, s: f"prune-{m}-{mode if m != 'random' else 'random'}-{k:g}-s{s}"  # noqa: E731
    subsets, children = {}, []
    for m in compared:
        for k in keeps:
            for s in seeds:
                ids = (kept_ids(np.zeros(run.num_train), k, mode="random", seed=s) if m == "random"
                       else kept_ids(values[m], k, mode=mode, offset=offset))
                subsets[m, k, s] = ids
                children.append((label(m, k, s), {**subset_config(base, ids, run.num_train), "seed": s}))
    children += [(f"all-s{s}", {**base, "seed": s}) for s in seeds]
    runs = train_children(run, children, jobs=jobs, device=dev, desc="prune")
    if world()[0] > 0:
        return None             # rank 0 evaluates and returns the result
    final = {}
    for (name, _), r in zip(children, runs):
        final[name] = float(r.metrics()["test_accuracy"][-1])
    shape = (len(compared), len(keeps), len(seeds))
    acc, kept, share = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    noisy = run.is_noisy
    for i, m in enumerate(compared):
        for j, k in enumerate(keeps):
            for t, s in enumerate(seeds):
                ids = subsets[m, k, s]
                acc[i, j, t] = final[label(m, k, s)]
                kept[i, j, t] = noisy[ids].sum() / noisy.sum() if noisy.any() else np.nan
                share[i, j, t] = noisy[ids].mean()
    dims = ("score", "keep", "seed")
    ds = xr.Dataset({"test_accuracy": (dims, acc), "noisy_kept": (dims, kept), "noisy_share": (dims, share),
                     "full_accuracy": ("seed", np.array([final[f"all-s{s}"] for s in seeds]))},
                    coords={"score": compared, "keep": keeps, "seed": seeds})
    k_used = default_epoch_k(run.final_epoch) if checkpoint is None else checkpoint
    config = {"by": names, "keep": keeps, "mode": mode, "offset": offset, "seeds": seeds, "checkpoint_k": k_used,
              "grand_epoch": grand_checkpoint, "also": [str(r.path) for r in also], "jobs": jobs, "device": str(dev), "epochs": base["epochs"],
              "precision": precision}
    return Result("prune", ds, config=config)


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--by", default="el2n,grand,forgetting",
                   help=f"comma-separated scores: {', '.join(n for n in SCORES if n != 'neuron_count')}")
    p.add_argument("--keep", default="0.9,0.7,0.5,0.3", help="comma-separated fractions of the training set kept, in (0, 1]")
    p.add_argument("--mode", default="hardest", choices=MODES,
                   help="which examples each score keeps: hardest (drop the easiest; Data Diet, Toneva et al.), "
                        "easiest, or window (skip the --offset hardest fraction, then keep the next)")
    p.add_argument("--offset", type=number(float, 0, 1, high_open=True), default=0.1,
                   help="hardest fraction skipped in --mode window")
    p.add_argument("--checkpoint-k", type=nonnegative_int, default=None,
                   help="epoch of EL2N (default: 10%% of training, at least 1)")
    p.add_argument("--also", nargs="+", default=[], metavar="RUN2",
                   help="more runs of the same data (other seeds) whose scores are averaged with RUN's (Data Diet "
                        "averages 10); the fresh runs use RUN's recipe")
    p.add_argument("--grand-epoch", type=nonnegative_int, default=0, help="epoch of GraNd (Data Diet: 0, initialisation)")
    add_experiment(p)


def _cli_execute(args):
    return prune(args.run, methods=args.by, keep=args.keep, mode=args.mode, offset=args.offset,
                 seeds=args.seeds, checkpoint=args.checkpoint_k, grand_checkpoint=args.grand_epoch, also=args.also, jobs=args.jobs,
                 device=args.device, precision=args.precision)


def _cli_summary(res, args):
    keeps = res["keep"].values
    head = f"{'kept':<12}" + "".join(f"{k:>22g}" for k in keeps)
    lines = [f"test accuracy (mean +- s.e. over {res.sizes['seed']} seed(s); all data: "
             f"{mean_se(res['full_accuracy'].values)})", head]
    for m in res["score"].values:
        acc = res["test_accuracy"].sel({"score": m}).values
        lines.append(f"{str(m):<12}" + "".join(f"{mean_se(acc[j]):>22}" for j in range(len(keeps))))
    if np.isfinite(res["noisy_kept"].values).any():
        lines.append("share of the noisy examples kept (seed mean):")
        for m in res["score"].values:
            lines.append(f"{str(m):<12}" + "".join(f"{v:>22.3f}" for v in res["noisy_kept"].sel({"score": m}).mean("seed").values))
    return "\n".join(lines)


def plot_prune(res, out, run=None) -> str:
    """Test accuracy vs fraction kept per score, random dashed, all data as a line; noisy examples kept."""
    keeps, compared = res["keep"].values, [str(m) for m in res["score"].values]
    noisy = np.isfinite(res["noisy_kept"].values).any()
    fig, axes = plt.subplots(1, 2 if noisy else 1, figsize=(10 if noisy else 5.5, 3.4), squeeze=False)
    ax = axes[0, 0]
    for i, m in enumerate(compared):
        mean, se = mean_se_axis(res["test_accuracy"].values[i])
        ax.errorbar(keeps, 100 * mean, yerr=100 * se, marker="o", capsize=3, label=m,
                    ls="--" if m == "random" else "-", color="k" if m == "random" else None)
    full, full_se = mean_se_axis(res["full_accuracy"].values)
    ax.axhline(100 * full, color="tab:gray", lw=1, label=f"all data ({100 * full:.1f})")
    ax.set(xlabel="fraction of the training set kept", ylabel="test accuracy (%)", title=f"pruning ({res.config.get('mode')} kept)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    if noisy:
        ax = axes[0, 1]
        for i, m in enumerate(compared):
            ax.plot(keeps, 100 * res["noisy_kept"].values[i].mean(-1), marker="o", label=m,
                    ls="--" if m == "random" else "-", color="k" if m == "random" else None)
        ax.set(xlabel="fraction kept", ylabel="mislabeled examples kept (%)", title="noise kept")
        ax.invert_xaxis()
    name = save_figure(fig, out, "prune.png")
    rows = []
    for i, m in enumerate(compared):
        mean, se = mean_se_axis(res["test_accuracy"].values[i])
        rows.append([m] + [plus_minus(a, e, res.sizes["seed"]) for a, e in zip(mean, se)])
    return (f"## Pruning\n\nFresh runs on the kept examples (seeds {', '.join(map(str, res['seed'].values))}); "
            f"all data: {plus_minus(full, full_se, res.sizes['seed'])}%.\n\n"
            + figure("prune", name, "test accuracy of fresh runs trained on the fraction of the training set (x "
                     "axis, falling to the right) that each score keeps; the dashed black line keeps a random "
                     "fraction, the grey line is all the data" + ("; the right panel: how many of the mislabeled "
                     "examples each choice kept." if noisy else ".")) + "\n\n"
            + table(["score"] + [f"keep {k:g}" for k in keeps], rows))


ANALYSIS = Analysis(
    name="prune", order=90, compute=prune,
    plot=plot_prune,
    schema=Schema("prune", "test accuracy of fresh runs trained on pruned training sets (memloc.prune)",
                  {"score": Var(("score",), "score that chose the kept examples, or random"),
                   "keep": Var(("keep",), "fraction of the training set kept"), "seed": Var(("seed",), "training seed")},
                  {"test_accuracy": Var(("score", "keep", "seed"), "final test accuracy of the run on the kept examples"),
                   "noisy_kept": Var(("score", "keep", "seed"), "share of the noisy examples that were kept (NaN without noise)"),
                   "noisy_share": Var(("score", "keep", "seed"), "share of the kept examples that are noisy"),
                   "full_accuracy": Var(("seed",), "final test accuracy trained on every example")}),
    command=Command(name="prune", group="acting", example="memloc prune RUN",
                    help='train on subsets kept by each score (Data Diet, forgetting) vs random',
                    sharded=True,
                    description="Keep a fraction of the training set chosen by each score (and at random, the reference), train a "
                                "fresh run on each kept set with the run's own recipe and seeds, record test accuracy and the share "
                                "of noisy examples kept. GraNd at initialisation and EL2N at epoch k as in Data Diet; forgetting "
                                "counts at the end. Writes RUN/results/prune.h5; fresh runs live under RUN/children.",
                    flags={"methods": "--by", "keep": "--keep", "runs": "--also", "checkpoint": "--checkpoint-k",
                           "grand_checkpoint": "--grand-epoch"},
                    interrupted="finished runs under RUN/children are kept; rerun the same command to go on",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
