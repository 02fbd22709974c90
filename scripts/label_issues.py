"""From finding to fixing on MNIST-5k: noise-rate estimates, flags vs cleanlab, cleaning gain, JTT.

    python scripts/label_issues.py --jobs 2 --markdown artifacts/label_issues.md

For every noise rate (symmetric 10 / 20 / 40%) and seed (training seed = noise seed, so each seed
has its own mislabeled set) trains the parent run (reused when it exists), then

1. estimates the noise rate without ground truth (``memloc.find_label_issues``) for the MLP and
   lenet runs and reports the error against the true rate;
2. compares the flagged sets' precision / recall with cleanlab's (5-fold cross-validation with the
   same recipe, ``cleanlab.filter.find_label_issues``) and with every single score as the ranking;
3. drops the flagged examples, retrains (seed of the parent) and compares test accuracy with
   training on all the data (``memloc.clean``), mean +- s.e. over the seeds;
4. JTT on the 20% MLP run of seed 0 (3 retraining seeds).
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
from memloc.analyses.label_issues import flag_quality  # noqa: E402
from memloc.training.train import resolve_config  # noqa: E402

EPOCHS = {"mlp": 30, "lenet": 40}
BY = ("combined", "confidence", "el2n", "aum", "variability", "forgetting", "final_loss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="label_issues.py", formatter_class=Formatter, description=__doc__.split("\n")[0])
    p.add_argument("--noise", default="0.1,0.2,0.4", help="comma-separated symmetric noise rates")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (training and noise)")
    p.add_argument("--models", default="mlp,lenet", help="models of the rate estimates (cleaning uses the first)")
    add_common(p, "runs/label_issues")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    rates = [float(r) for r in args.noise.split(",")]
    models = args.models.split(",")
    root = Path(args.runs_dir)
    parents = {(m, r, s): root / f"{m}_n{r:g}_s{s}" for m in models for r in rates for s in args.seeds}
    cfgs = {k: resolve_config({"model": k[0], "noise": k[1], "seed": k[2], "noise_seed": k[2],
                               "epochs": EPOCHS.get(k[0], 30)}) for k in parents}
    train_runs([(parents[k], cfgs[k]) for k in parents], jobs=args.jobs, device=args.device, desc="parents")
    out = ["# From finding to fixing: label issues without ground truth, cleaning, JTT (MNIST-5k)\n",
           f"Made by `python scripts/label_issues.py --jobs {args.jobs} --noise {args.noise} --seeds "
           f"{' '.join(map(str, args.seeds))} --models {args.models}` (CPU, 2 cores). Symmetric noise; seed = training "
           "seed = noise seed (each seed its own mislabeled set). Means +- standard error over the seeds.\n"]

    # 1. noise-rate estimates
    out += ["## 1. Noise rate estimated without ground truth\n",
            "Calibrated confident joint (confident learning) on the softmax of the run's own checkpoint at epoch k "
            "(10% of training: epoch 3 of 30 for the MLP, 4 of 40 for lenet), no extra training.\n",
            "| model | true rate | estimate | error (points) | per seed |", "|---|---:|---:|---:|---|"]
    issues = {}
    for m in models:
        for r in rates:
            est = []
            for s in args.seeds:
                res = memloc.find_label_issues(parents[m, r, s], device=args.device)
                issues[m, r, s] = res
                est.append(float(res["rate_estimate"]))
            est = np.array(est)
            out.append(f"| {m} | {r:.2f} | {mean_se(est)} | {100 * (est.mean() - r):+.2f} | "
                       f"{', '.join(f'{e:.4f}' for e in est)} |")
    print("\n".join(out[-len(models) * len(rates) - 2:]))

    # 2 + 3. flags and cleaning, with cleanlab
    m = models[0]
    out += ["", f"## 2. Flagged sets ({m}): memloc vs cleanlab\n",
            "memloc flags the round(estimate x N) top-ranked examples (`--by combined`); cleanlab flags on 5-fold "
            "out-of-sample probabilities from the same recipe (5 extra trainings per run).\n",
            "| noise | memloc flagged | memloc precision | memloc recall | cleanlab flagged | cleanlab precision | "
            "cleanlab recall |", "|---|---:|---:|---:|---:|---:|---:|"]
    cleans = {}
    for r in rates:
        for s in args.seeds:
            cleans[r, s] = memloc.clean(parents[m, r, s], seeds=[s], jobs=args.jobs, device=args.device)
            cleans[r, s].save(memloc.load(parents[m, r, s]).results_path("clean"))
        c = [cleans[r, s] for s in args.seeds]
        cell = lambda f, v: mean_se([float(x[v].sel(flags=f)) for x in c], 1 if v == "flagged" else 4)  # noqa: E731
        out.append(f"| {r:.2f} | {cell('memloc', 'flagged')} | {cell('memloc', 'precision')} | "
                   f"{cell('memloc', 'recall')} | {cell('cleanlab', 'flagged')} | {cell('cleanlab', 'precision')} | "
                   f"{cell('cleanlab', 'recall')} |")
    out += ["", f"Every ranking at memloc's estimated rate ({m}; precision = recall when the estimate equals the "
            "true rate):\n", "| noise | " + " | ".join(BY) + " |", "|---|" + "---:|" * len(BY)]
    for r in rates:
        cells = []
        for by in BY:
            prec = []
            for s in args.seeds:
                run = memloc.load(parents[m, r, s])
                res = memloc.find_label_issues(run, method=by, rate=float(issues[m, r, s]["rate_estimate"]),
                                               device=args.device)
                prec.append(flag_quality(res["flagged"].values, run.is_noisy)["precision"])
            cells.append(mean_se(prec))
        out.append(f"| {r:.2f} | " + " | ".join(cells) + " |")
    out += ["", f"## 3. Cleaning: drop the flagged examples and retrain ({m})\n",
            "Test accuracy of the final checkpoint; `all` = the parent run (all data, noisy labels included).\n",
            "| noise | all data | memloc drop | gain | cleanlab drop | gain | noise left memloc / cleanlab |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rates:
        acc = {f: np.array([float(cleans[r, s]["test_accuracy"].sel(flags=f).values[0]) for s in args.seeds])
               for f in ("all", "memloc", "cleanlab")}
        left = {f: np.mean([float(cleans[r, s]["noise_left"].sel(flags=f)) for s in args.seeds])
                for f in ("memloc", "cleanlab")}
        out.append(f"| {r:.2f} | {mean_se(acc['all'])} | {mean_se(acc['memloc'])} | "
                   f"{mean_se(acc['memloc'] - acc['all'])} | {mean_se(acc['cleanlab'])} | "
                   f"{mean_se(acc['cleanlab'] - acc['all'])} | {left['memloc']:.4f} / {left['cleanlab']:.4f} |")

    # 4. JTT
    r_jtt = 0.2 if 0.2 in rates else rates[0]
    j = memloc.jtt(parents[m, r_jtt, args.seeds[0]], seeds=args.seeds, jobs=args.jobs, device=args.device)
    out += ["", f"## 4. JTT ({m}, {r_jtt:.0%} noise, seed {args.seeds[0]}; retrained with seeds "
            f"{', '.join(map(str, args.seeds))})\n",
            f"Error set of epoch {j.config['id_epoch']}: {j.sizes['error']} examples, "
            f"{float(j['error_set_noisy']):.1%} of them mislabeled; upweight {j.config['upweight']:g}.\n",
            "| group | ERM | JTT |", "|---|---:|---:|"]
    for g in j["group"].values:
        out.append(f"| {g} | {mean_se(j['accuracy'].sel(variant='erm', group=g).values)} | "
                   f"{mean_se(j['accuracy'].sel(variant='jtt', group=g).values)} |")
    finish(out, t0, args.markdown)


if __name__ == "__main__":
    main()
