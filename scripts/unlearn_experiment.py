"""Removing memorised labels from trained MNIST-5k models: every unlearning method, 3 seeds, a Pareto figure.

    python scripts/unlearn_experiment.py --markdown artifacts/unlearn_mnist5k.md --figure artifacts/unlearn_pareto.png

For each model (MLP 30 epochs, lenet 40 epochs; 10% symmetric noise, seed 0) trains the run (reused
when it exists), runs ``memloc flip`` on every noisy example (units for the ``zero`` method),
``memloc retrain`` (the critical layer of ``retrain_layer``), ``memloc importance`` (Fisher and MAS
overlap with the flip units) and ``memloc unlearn`` with forget = noisy (ground truth) and, for
the MLP, forget = flagged (``memloc issues``: no ground truth). Table: accuracy on the forget set
(given labels: memorisation left; true labels), retain set and test, mean +- s.e. over the seeds,
with seconds and passes over the data; figure: memorisation removed vs test accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memloc  # noqa: E402
from _markdown import add_common, finish  # noqa: E402
from memloc.cli.runner import Formatter, mean_se  # noqa: E402
from memloc.actions.children import train_runs  # noqa: E402
from memloc.analyses.importance import flip_units  # noqa: E402
from memloc.actions.unlearn import draw_pareto  # noqa: E402
from memloc.training.train import resolve_config  # noqa: E402
from memloc.core.units import trace  # noqa: E402
from memloc.actions.unlearn import GROUPS, HYPER  # noqa: E402

EPOCHS = {"mlp": 30, "lenet": 40}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="unlearn_experiment.py", formatter_class=Formatter,
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mlp,lenet")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--figure", default=None, help="write the Pareto figure (PNG) here")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: memloc unlearn's)")
    add_common(p, "runs/unlearn")
    return p.parse_args(argv)


def ensure(run, name, fn):
    """The saved result ``name`` of ``run``, computed with ``fn()`` and saved when missing."""
    if not run.results_path(name).is_file():
        fn().save(run.results_path(name))
    return run.result(name)


def table(res, title):
    out = [f"### {title}\n", f"Forget set: {res.sizes['forget']} examples. Trained model: "
           + ", ".join(f"{g} {float(v):.4f}" for g, v in zip(GROUPS, res["baseline"].values)) + ".\n",
           "| method | " + " | ".join(GROUPS) + " | seconds | passes |", "|---|" + "---:|" * (len(GROUPS) + 2)]
    for m in res["technique"].values:
        r = res.sel(technique=m)
        out.append(f"| {m} | " + " | ".join(mean_se(r["accuracy"].sel(group=g).values) for g in GROUPS)
                   + f" | {float(r['seconds'].mean()):.1f} | {float(r['passes']):.2f} |")
    return out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    models = args.models.split(",")
    root = Path(args.runs_dir)
    paths = {m: root / f"{m}_n0.1_s0" for m in models}
    train_runs([(paths[m], resolve_config({"model": m, "epochs": EPOCHS.get(m, 30)})) for m in models],
               jobs=args.jobs, device=args.device, desc="runs")
    out = ["# Unlearning memorised labels (MNIST-5k, 10% symmetric noise)\n",
           f"Made by `python scripts/unlearn_experiment.py --models {args.models} --seeds "
           f"{' '.join(map(str, args.seeds))}{'' if args.lr is None else f' --lr {args.lr:g}'}` (CPU, 2 cores). "
           "Every method starts from the final checkpoint; "
           "forget_given = accuracy on the forget set w.r.t. the labels it was trained on (memorisation left), "
           "forget_true w.r.t. the true labels, retain = the other training examples; mean +- s.e. over the seeds "
           f"(batch order). Fine-tuning 5 epochs at lr {args.lr or HYPER['lr']:g}, lambda 10 (EWC, MAS; "
           "importance divided by its maximum), 1 (LwF, T = 2), ascent 3 passes at lr 0.003, retrain_layer 20 "
           "epochs.\n"]
    results = {}
    lr = {} if args.lr is None else {"lr": args.lr}
    for m in models:
        run = memloc.load(paths[m])
        ensure(run, "flip", lambda: memloc.flip(run, examples="noisy:all", device=args.device))
        ensure(run, "retrain", lambda: memloc.retrain(run, device=args.device))
        overlaps = []
        for method in ("fisher", "mas"):
            imp = memloc.importance(run, method=method, device=args.device)
            overlaps.append(f"{method} {float(imp['flip_overlap']):.3f}" if "flip_overlap" in imp else f"{method} -")
            if method == "fisher":
                imp.save(run.results_path("importance"))
        n_flip = len(flip_units(run))
        units = sum(s.size for s in trace(run.model(), run.data().train.x[:2]).spaces)
        p = n_flip / units
        res = memloc.unlearn(run, forget="noisy", seeds=args.seeds, device=args.device, **lr)
        res.save(run.results_path("unlearn"))
        results[m, "noisy"] = res
        out += ["", *table(res, f"{m}: forget = noisy (ground truth)"),
                "", f"Importance vs flip: Jaccard overlap of the {n_flip} units flip zeroed for noisy examples with "
                f"as many top noisy-importance units: {', '.join(overlaps)} (chance {p / (2 - p):.3f})."]
        if m == models[0]:
            ensure(run, "issues", lambda: memloc.find_label_issues(run, device=args.device))
            flagged = memloc.unlearn(run, forget="flagged", seeds=args.seeds, device=args.device, **lr)
            results[m, "flagged"] = flagged
            out += ["", *table(flagged, f"{m}: forget = flagged by memloc issues (no ground truth); "
                                        f"{int(np.isin(flagged['forget'].values, np.flatnonzero(run.is_noisy)).sum())} "
                                        "of them noisy")]
        print("\n".join(out))
    if args.figure:
        pareto(results, args.figure)
        out.append(f"\n![Pareto]({Path(args.figure).name})")
    finish(out, t0, args.markdown)


def pareto(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.8), squeeze=False)
    for ax, ((model, forget), res) in zip(axes[0], results.items()):
        draw_pareto(ax, res, f"{model}, forget = {forget}")
    axes[0, -1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
