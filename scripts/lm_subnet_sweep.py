"""BalancedSubnet swept (issue 24): does any setting of it come near the mitigation goal on our runs?

    python scripts/lm_subnet_sweep.py            # -> artifacts/lm_subnet_sweep.md (about 15 minutes)

TinyMem (Sakarvadia et al. 2025) sweeps each method's hyper-parameters per model and keeps the best;
memloc's tables (lm_mitigation.py, lm_mitigation_speed.py) run BalancedSubnet at memloc's defaults (SGD
lr 0.1, 50 epochs), where it leaves 10-16% of the noisy sequences at a loss of about 10 points. Here,
on lm_mitigation.py's runs, BalancedSubnet runs at every `--lrs` x `--epochs` x `--fractions` (the share
of each MLP matrix pruned) for each of `--seeds` draws, measured as lm_mitigation_speed.py measures: held-out
token accuracy on its fresh test sequences, the CPU time of each edit alone on one torch thread. Per model:
every setting, then the one leaving the fewest noisy sequences among those losing at most the goal's 0.1
points on average.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import finish, invocation  # noqa: E402
from lm_benchmark import MODELS  # noqa: E402
from lm_mitigation import GOAL, meets_goal  # noqa: E402
from lm_mitigation_speed import EDITS, _timed, common_arguments, edit_seconds, header, prepared  # noqa: E402

import memloc  # noqa: E402
from memloc.analyses.mitigation.methods import FUNCTIONS  # noqa: E402

METHOD = "balanced_subnet"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def section(name: str, args) -> list[str]:
    run, big, n_big = prepared(name, args)
    got = {}                    # (lr, epochs, fraction) -> [(left, accuracy change in points, CPU s)] per seed
    for lr, epochs in itertools.product(args.lrs, args.epochs):
        for seed in args.seeds:
            EDITS.clear()
            res = memloc.mitigate(run, big, methods=[METHOD], fractions=tuple(args.fractions), ref_batch_size=64,
                                  seed=seed, options={METHOD: {"lr": lr, "epochs": epochs}},
                                  device=args.device).dataset
            before = float(res["test_accuracy_before"])
            for i, fraction in enumerate(res["fraction"].values):
                got.setdefault((lr, epochs, float(fraction)), []).append(
                    (float(res["targets_memorised"][i]), 100 * (float(res["test_accuracy"][i]) - before),
                     edit_seconds(i, args.device)))
            print(f"{name} lr {lr} epochs {epochs} seed {seed}: " + ", ".join(
                f"{f}: {v[-1][0]:.1%} left {v[-1][1]:+.2f}" for (l, e, f), v in got.items() if (l, e) == (lr, epochs)),
                file=sys.stderr, flush=True)
    left, lost = GOAL
    lines = [f"## {MODELS[name]} (`{name}`)", "",
             f"Held-out token accuracy before: {before:.2%} on {n_big} fresh test sequences. Means over "
             f"{len(args.seeds)} draws.", "",
             "| lr | epochs | fraction | noisy left: mean | worst | accuracy change: mean | min | CPU s (median) "
             "| goal met |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (lr, epochs, fraction), rows in got.items():
        a = np.array(rows)
        met = sum(meets_goal(r[0], r[1]) for r in rows)
        lines.append(f"| {lr:g} | {epochs} | {fraction:g} | {a[:, 0].mean():.1%} | {a[:, 0].max():.1%} | "
                     f"{a[:, 1].mean():+.2f} | {a[:, 1].min():+.2f} | {np.median(a[:, 2]):.2f} | {met}/{len(rows)} |")
    kept = [(np.mean([r[0] for r in rows]), k) for k, rows in got.items() if -np.mean([r[1] for r in rows]) <= lost]
    if kept:
        share, (lr, epochs, fraction) = min(kept)
        lines += ["", f"Fewest noisy sequences left at no more than {lost} points lost on average: lr {lr:g}, "
                  f"{epochs} epochs, fraction {fraction:g}: {share:.1%} left (goal: at most {left:.0%})."]
    else:
        lines += ["", f"No setting loses at most {lost} points on average."]
    return [*lines, ""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(p, "artifacts/lm_subnet_sweep.md", [0, 1])
    p.add_argument("--lrs", type=_floats, default=[0.01, 0.1, 0.5], help="comma-separated SGD learning rates")
    p.add_argument("--epochs", type=lambda s: [int(x) for x in s.split(",")], default=[50, 150],
                   help="comma-separated epochs of mask learning")
    p.add_argument("--fractions", type=_floats, default=[0.005, 0.01, 0.02, 0.05],
                   help="comma-separated shares of each MLP matrix pruned")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    FUNCTIONS[METHOD] = _timed(FUNCTIONS[METHOD])
    started, load = time.time(), os.getloadavg()[0]
    body = [line for name in args.models.split(",") for line in section(name, args)]
    lines = [f"`{invocation(__file__, argv)}`", "",
             "# BalancedSubnet swept: learning rate x epochs x fraction", "",
             f"{header(args, load)}; the other settings memloc's defaults (momentum 0.9, weight decay "
             f"5e-4, batch 64). Goal: at most {GOAL[0]:.0%} of the noisy sequences left at no more than {GOAL[1]} "
             "points of held-out token accuracy lost. memloc's fine_tune_greedy on the same runs and test sequences: "
             "artifacts/lm_mitigation_speed.md.", "", *body]
    finish(lines, started, args.out)


if __name__ == "__main__":
    main()
