"""Greedy zeroing on a TinyMem language model: units vs individual weights (Maini et al.'s weight-level rule).

    python scripts/lm_weight_zeroing.py     # reuses (or trains) runs/tinymem, writes artifacts/lm_weight_zeroing.md

The run is scripts/tinymem_experiment.py's (as scripts/lm_zeroing.py's). The same sequences (every
memorised target and a sample of clean training sequences the model reproduces) are searched three
ways by ``memloc.flip``: units (``site="pre_norm"``: an output feature of a linear layer), individual
weights (``site="weight"``: a weight or bias element of the blocks' projections, the official rule:
highest positive weight x gradient), and individual weights with the target's logits averaged over
noised copies (``noise_samples``: Gaussian noise on the token embeddings). A search ends when the
suffix is no longer reproduced exactly. Reported per way: the zeroed count of targets and of clean
sequences (medians, shares broken), the AUROC of "fewer zeroed = target", CPU seconds. One thread.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import finish, flip_search_arguments, invocation, machine  # noqa: E402
from tinymem_experiment import CONFIG  # noqa: E402

import memloc  # noqa: E402

WAYS = {"units": dict(site="pre_norm"), "weights": dict(site="weight"),
        "weights, noised embeddings": dict(site="weight", noise_samples=5, noise_ratio=0.01)}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    flip_search_arguments(p, out="artifacts/lm_weight_zeroing.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load = time.time(), os.getloadavg()[0]
    run = memloc.train(args.run, CONFIG, device=args.device, resume=True)
    from sklearn.metrics import roc_auc_score
    rows = ["| zeroed | searched targets / clean | broken within the cap, targets / clean | median zeroed, targets "
            "| median zeroed, clean | broken by one, targets / clean | AUROC (fewer = target) | CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    counts = {}
    for name, kw in WAYS.items():
        t = cpu_seconds()
        res = memloc.flip(run, examples={"noisy": "all", "clean": args.clean}, max_units=args.max_units,
                          ref_batch_size=args.ref_batch_size, seed=args.seed, device=args.device, resume=None, **kw)
        seconds = cpu_seconds() - t
        searched = res["status"].values == 0
        target = res["is_noisy"].values.astype(bool)
        count, flipped = res["neuron_count"].values, res["flipped"].values[:, 0]
        t_, c_ = searched & target, searched & ~target
        counts[name] = count
        auc = float(roc_auc_score(target[searched], -count[searched]))
        rows.append(f"| {name} (`{res.config['site']}`, {sum(int(s) for s in res['layer_size'].values)} candidates) | "
                    f"{t_.sum()} / {c_.sum()} | {100 * flipped[t_].mean():.0f}% / {100 * flipped[c_].mean():.0f}% | "
                    f"{np.median(count[t_]):g} | {np.median(count[c_]):g} | {100 * (count[t_] == 1).mean():.0f}% / "
                    f"{100 * (count[c_] == 1).mean():.0f}% | {auc:.3f} | {seconds:.0f} |")
    from scipy.stats import spearmanr
    ok = searched
    rho = spearmanr(counts["units"][ok], counts["weights"][ok]).statistic
    rho_noise = spearmanr(counts["weights"][ok], counts["weights, noised embeddings"][ok]).statistic
    lines = [
        f"`{invocation(__file__, argv)}`", "",
        "# Greedy zeroing on a language model: units vs individual weights", "",
        f"memloc {memloc.__version__}; {machine(args.device)}; commit {commit()}; load average at the start "
        f"{load:.1f} (shared machine: read CPU seconds to one digit).", "",
        f"Run `{args.run}` (scripts/tinymem_experiment.py's: {', '.join(f'{k}={v}' for k, v in CONFIG.items())}). "
        f"Searched: every target the model reproduces and clean:{args.clean} (those reproduced), reference batch of "
        f"{args.ref_batch_size} clean sequences, float32, at most {args.max_units} zeroed (not broken counts "
        f"{args.max_units + 1}); equivalently `memloc flip {args.run} --examples noisy:all,clean:{args.clean} "
        f"--max-units {args.max_units} --ref-batch-size {args.ref_batch_size} --site pre_norm` / `--site weight` / "
        "`--site weight --noise-samples 5 --noise-ratio 0.01`. Weights: the weight and bias elements of the blocks' "
        "attention and MLP projections (embeddings, norms and the logits layer left out); noise: on the token "
        "embeddings, norm 0.01 x theirs, 5 copies whose logits are averaged.", "",
        *rows, "",
        f"Spearman correlation over the searched sequences of the zeroed counts: units vs weights {rho:.2f}, weights "
        f"vs weights with noised embeddings {rho_noise:.2f}.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    finish(lines, started, args.out)


if __name__ == "__main__":
    main()
