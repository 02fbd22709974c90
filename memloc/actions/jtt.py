"""JTT, just train twice (Liu et al. 2021): upweight what an early model gets wrong, train again.

``memloc.jtt(run, checkpoint=T, upweight=LAMBDA)`` (command: ``python -m memloc jtt RUN``): the
identification model is the parent run at epoch T; its error set is the training examples it
misclassifies (w.r.t. the given labels, eval mode, ``run.h5`` /dynamics/end/correct row T). Fresh
runs with the parent's recipe are trained with the error set's loss weighted by LAMBDA (weights
normalised to mean 1, so the step size matches; in expectation the same as JTT's upsampling by
LAMBDA) beside plain runs (ERM), and both are measured on the groups memloc can name: test, the
worst class on test, clean training examples, noisy ones w.r.t. their given (memorised) and true
labels. Under label noise the error set is mostly the mislabeled examples, so JTT upweights
exactly what should not be learned: expect it to memorise more, not to generalise better.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..scale.distributed import world
from ..core.errors import MemlocError
from ..core.evaluate import evaluate, nanmean, subset_accuracies
from ..core.precision import autocast, check_precision, laid_out
from ..core.results import Result
from ..core.run import as_run
from ..core.runtime import check_range, resolve_device
from .children import check_seeds, parent_config, train_children
from ..core.options import add_experiment, mean_se, nonnegative_int, positive_float
from ..core.figures import figure, plt, save_figure, table, mean_se_axis
from ..core.schemas import Schema, Var
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored

__all__ = ["GROUPS", "error_set", "group_accuracies", "jtt"]

GROUPS = ("test", "worst_class", "clean", "noisy_given", "noisy_true")


def error_set(run, id_epoch: int) -> np.ndarray:
    """Ids of the training examples the model of epoch ``id_epoch`` misclassifies (given labels)."""
    id_epoch = check_range("checkpoint", id_epoch, low=0, high=run.final_epoch, integer=True)
    correct = run.dynamics("correct", "end")[id_epoch]
    return np.flatnonzero(correct == 0)


def group_accuracies(model, data, *, batch_size: int = 1024) -> np.ndarray:
    """Accuracy on :data:`GROUPS` (NaN for the noisy groups without noise) as a (5,) array."""
    train = evaluate(model, data.train.batches(batch_size))           # one pass over each set
    test = evaluate(model, data.test.batches(batch_size))
    order = np.argsort(train["idx"])
    acc = subset_accuracies(train["correct"][order], train["pred"][order], data.is_noisy, data.label_true)
    labels = data.test.y.cpu().numpy()[np.argsort(test["idx"])]
    correct = test["correct"][np.argsort(test["idx"])]
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    return np.array([nanmean(correct), min(per_class) if per_class else np.nan, acc["clean"], acc["noisy"],
                     acc["noisy_true"]], dtype=np.float64)


@renamed(run="source", id_epoch="checkpoint", batch_size="eval_batch_size")
@stored('jtt')
def jtt(source, *, checkpoint: int | None = None, upweight: float = 5.0, seeds=(0, 1, 2), jobs: int = 1,
        device="auto", eval_batch_size: int = 1024, precision: str = "fp32") -> Result | None:
    """The ``"jtt"`` result: group accuracies of ERM and JTT runs per seed, and the error set.

    ``checkpoint``: the epoch T (default: 10% of training, the identification model of an early-stopped ERM
    run; Liu et al. tune T on a validation set) and ``upweight`` (lambda_up; Liu et al. use 5-100).
    Under torchrun the fresh runs are split across the processes (:mod:`memloc.actions.children`)
    and rank 0 returns the result, the other ranks None. ``precision``: of the group accuracies' passes
    (:mod:`memloc.core.precision`); the fresh runs train with the parent's recipe, in its precision.
    """
    from ..analyses.scores import default_epoch_k
    check_precision(precision)
    run = as_run(source)
    base = parent_config(run)
    id_epoch = default_epoch_k(run.final_epoch) if checkpoint is None else checkpoint
    upweight = check_range("upweight", upweight, low=0, low_open=True)
    jobs = check_range("jobs", jobs, low=1, integer=True)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    seeds = check_seeds(seeds)
    errors = error_set(run, id_epoch)
    if not len(errors):
        raise MemlocError(f"the model of epoch {id_epoch} misclassifies no training example: nothing to upweight "
                          "(choose an earlier checkpoint)", argument="checkpoint")
    dev = resolve_device(device)
    check_precision(precision, dev)
    children = [(f"all-s{s}", {**base, "seed": s}) for s in seeds]
    children += [(f"jtt-T{id_epoch}-up{upweight:g}-s{s}",
                  {**base, "seed": s, "upweight": float(upweight), "upweight_ids": errors.tolist()}) for s in seeds]
    runs = train_children(run, children, jobs=jobs, device=dev, desc="jtt")
    if world()[0] > 0:
        return None             # rank 0 evaluates and returns the result
    data = run.data(dev)
    with autocast(precision, dev):
        acc = np.stack([group_accuracies(laid_out(r.model(device=dev), precision, dev), data, batch_size=eval_batch_size)
                        for r in runs])
    noisy = run.is_noisy
    ds = xr.Dataset({"accuracy": (("variant", "seed", "group"), acc.reshape(2, len(seeds), len(GROUPS))),
                     "error_set": ("error", errors),
                     "error_set_noisy": ((), float(noisy[errors].mean()) if noisy.any() else np.nan)},
                    coords={"variant": ["erm", "jtt"], "seed": seeds, "group": list(GROUPS)})
    config = {"id_epoch": int(id_epoch), "upweight": float(upweight), "seeds": seeds, "jobs": jobs, "device": str(dev),
              "precision": precision}
    return Result("jtt", ds, config=config)


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--id-epochs", "--id-epoch", dest="id_epoch", type=nonnegative_int, default=None,
                   help="epoch T of the identification model (default: 10%% of training, at least 1)")
    p.add_argument("--upweight", type=positive_float, default=5.0, help="lambda_up, the error set's loss weight")
    add_experiment(p)


def _cli_execute(args):
    return jtt(args.run, checkpoint=args.id_epoch, upweight=args.upweight, seeds=args.seeds, jobs=args.jobs,
               device=args.device, precision=args.precision)


def _cli_summary(res, args):
    lines = [f"error set of epoch {res.config['id_epoch']}: {res.sizes['error']} examples"
             + (f" ({float(res['error_set_noisy']):.1%} noisy)" if res['error_set_noisy'].notnull() else ""),
             f"accuracy (mean +- s.e. over {res.sizes['seed']} seed(s)), upweight {res.config['upweight']:g}:",
             f"{'group':<12}" + "".join(f"{m:>22}" for m in res["variant"].values)]
    for g in GROUPS:
        lines.append(f"{g:<12}" + "".join(f"{mean_se(res['accuracy'].sel(variant=m, group=g).values):>22}"
                                          for m in res["variant"].values))
    return "\n".join(lines)


def plot_jtt(res, out, run=None) -> str:
    """ERM vs JTT accuracy per group."""
    groups, variants = [str(g) for g in res["group"].values], [str(v) for v in res["variant"].values]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    x = np.arange(len(groups))
    for i, v in enumerate(variants):
        mean, se = mean_se_axis(res["accuracy"].values[i], axis=0)
        ax.bar(x + (i - 0.5) * 0.4, 100 * mean, 0.4, yerr=100 * se, capsize=3, label=v)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 101), title=f"JTT: error set of epoch {res.config.get('id_epoch')} "
                                                       f"upweighted x{res.config.get('upweight'):g}")
    ax.legend(fontsize=8)
    name = save_figure(fig, out, "jtt.png")
    rows = [[v] + [f"{100 * m:.1f}" for m in mean_se_axis(res["accuracy"].values[i], axis=0)[0]]
            for i, v in enumerate(variants)]
    noisy = float(res["error_set_noisy"])
    return (f"## JTT\n\nError set: {res.sizes['error']} examples"
            + (f" ({noisy:.1%} mislabeled)" if np.isfinite(noisy) else "") + ".\n\n"
            + figure("jtt", name, "accuracy per group after plain retraining (erm) and after JTT's upweighting "
                     "(jtt); a higher noisy_given bar under jtt means the wrong labels were memorised harder.")
            + "\n\n"
            + table(["training"] + groups, rows))


ANALYSIS = Analysis(
    name="jtt", order=110, compute=jtt,
    plot=plot_jtt,
    schema=Schema("jtt", "just train twice: the identification model's error set upweighted, retrained (memloc.jtt)",
                  {"variant": Var(("variant",), "erm (plain retraining), jtt (error set upweighted)"),
                   "seed": Var(("seed",), "training seed"),
                   "group": Var(("group",), "test, worst_class (worst per-class test accuracy), clean (training, given = true), "
                                             "noisy_given (memorised), noisy_true (noisy examples w.r.t. true labels)")},
                  {"accuracy": Var(("variant", "seed", "group"), "final accuracy on the group"),
                   "error_set": Var(("error",), "ids of the identification model's misclassified training examples"),
                   "error_set_noisy": Var((), "share of the error set that is noisy (NaN without ground truth)")}),
    command=Command(name="jtt", group="acting", example="memloc jtt RUN",
                    help="just train twice: upweight the early model's errors and retrain",
                    sharded=True,
                    description="JTT (Liu et al. 2021): the training examples the run's model of epoch T misclassifies are upweighted "
                                "by LAMBDA in fresh runs with the run's recipe; accuracy of ERM and JTT on test, the worst test class, "
                                "clean and noisy training examples. Writes RUN/results/jtt.h5; fresh runs live under RUN/children.",
                    flags={"checkpoint": "--id-epochs"},
                    interrupted="finished runs under RUN/children are kept; rerun the same command to go on",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
