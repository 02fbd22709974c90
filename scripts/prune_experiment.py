"""Data pruning on MNIST-5k (Data Diet, forgetting) vs random, and how much the scores agree.

    python scripts/prune_experiment.py --jobs 2 --markdown artifacts/prune_mnist5k.md

For each noise rate (default 0 and 0.1) trains the MLP parent (seed 0, reused when it exists),
then ``memloc.prune`` keeps 90 / 70 / 50 / 30% of the training set by each score (hardest kept:
Data Diet's GraNd at initialisation and EL2N at epoch k, Toneva et al.'s forgetting counts, AUM)
and at random, trains 3 seeds per kept set and reports test accuracy (mean +- s.e.). Under noise
also the ``window`` mode of Data Diet (skip the ``--offset`` hardest fraction). Finally the
Spearman agreement between the scores and of each score across the 3 full-data seeds
(``memloc.score_agreement``; Toneva et al. report 0.89 for forgetting counts across 10 seeds).
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
from memloc.actions.children import child_path, parent_config, train_runs  # noqa: E402
from memloc.training.train import resolve_config  # noqa: E402

AGREE = ("confidence", "el2n", "grand", "aum", "forgetting", "variability", "tracin")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="prune_experiment.py", formatter_class=Formatter,
                                description=__doc__.split("\n")[0])
    p.add_argument("--noise", default="0,0.1", help="comma-separated symmetric noise rates")
    p.add_argument("--by", default="el2n,grand,forgetting,aum", help="pruning scores")
    p.add_argument("--keep", default="0.9,0.7,0.5,0.3", help="fractions kept")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the pruned runs")
    p.add_argument("--offset", type=float, default=0.1, help="window mode: hardest fraction skipped (under noise)")
    p.add_argument("--window-by", default="el2n,forgetting", help="scores also run in window mode under noise")
    add_common(p, "runs/prune")
    return p.parse_args(argv)


def table(res, title):
    keeps = [float(k) for k in res["keep"].values]
    out = [f"### {title}\n", f"All data: {mean_se(res['full_accuracy'].values)}.\n",
           "| score | " + " | ".join(f"keep {k:g}" for k in keeps) + " |", "|---|" + "---:|" * len(keeps)]
    for m in res["score"].values:
        out.append(f"| {m} | " + " | ".join(mean_se(res["test_accuracy"].sel({"score": m, "keep": k}).values)
                                            for k in keeps) + " |")
    if np.isfinite(res["noisy_kept"].values).any():
        out += ["", "Share of the mislabeled examples kept (seed mean):\n",
                "| score | " + " | ".join(f"keep {k:g}" for k in keeps) + " |", "|---|" + "---:|" * len(keeps)]
        for m in res["score"].values:
            out.append(f"| {m} | " + " | ".join(f"{float(res['noisy_kept'].sel({'score': m, 'keep': k}).mean()):.3f}"
                                                for k in keeps) + " |")
    return out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    rates = [float(r) for r in args.noise.split(",")]
    keeps = [float(k) for k in args.keep.split(",")]
    root = Path(args.runs_dir)
    parents = {r: root / f"mlp_n{r:g}_s0" for r in rates}
    train_runs([(parents[r], resolve_config({"model": "mlp", "noise": r})) for r in rates], jobs=args.jobs,
               device=args.device, desc="parents")
    out = ["# Data pruning on MNIST-5k (MLP): scores vs random\n",
           f"Made by `python scripts/prune_experiment.py --jobs {args.jobs} --noise {args.noise} --by {args.by} "
           f"--keep {args.keep} --seeds {' '.join(map(str, args.seeds))} --offset {args.offset} --window-by "
           f"{args.window_by}` (CPU, 2 cores). Each cell: final test accuracy of fresh runs (the parent's recipe: "
           "30 epochs, one-cycle) on the kept examples, mean +- s.e. over the seeds. Scores from the seed-0 parent: "
           "GraNd at initialisation, EL2N at epoch 3, forgetting and AUM over all 30 epochs; `hardest` keeps the "
           "highest-scoring examples (drops the easiest).\n"]
    for r in rates:
        res = memloc.prune(parents[r], methods=args.by, keep=keeps, seeds=args.seeds, jobs=args.jobs, device=args.device)
        res.save(memloc.load(parents[r]).results_path("prune"))
        out += ["", *table(res, f"Noise {r:g}, mode hardest")]
        if r > 0 and args.window_by:
            win = memloc.prune(parents[r], methods=args.window_by, keep=keeps, mode="window", offset=args.offset,
                               seeds=args.seeds, jobs=args.jobs, device=args.device)
            out += ["", *table(win, f"Noise {r:g}, mode window (offset {args.offset:g}: the hardest "
                                    f"{args.offset:.0%} skipped)")]
        # agreement across the full-data seeds (same data, different training seeds)
        parent = memloc.load(parents[r])
        base = parent_config(parent)
        runs = [child_path(parent, f"all-s{s}", {**base, "seed": s}) for s in args.seeds]
        results = [memloc.scores(memloc.load(path), methods=list(AGREE), device=args.device) for path in runs]
        agree = memloc.score_agreement(results)
        cols = list(agree["score"].values)
        out += ["", f"### Noise {r:g}: Spearman agreement\n",
                f"Between scores (direction-adjusted: positive = they flag the same examples), mean over the "
                f"{len(results)} full-data seeds; last row: each score with itself across seeds (mean over seed pairs).\n",
                "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for a in cols:
            out.append(f"| {a} | " + " | ".join(f"{float(agree['between'].sel(score=a, score_b=b)):.2f}"
                                                for b in cols) + " |")
        out.append("| **across seeds** | " + " | ".join(f"{float(agree['across_runs'].sel(score=a)):.2f}"
                                                       for a in cols) + " |")
        print("\n".join(out))
    finish(out, t0, args.markdown)


if __name__ == "__main__":
    main()
