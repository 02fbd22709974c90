"""Two suspicious observations on language-model runs, checked: does evaluation change training, does
one epoch of retraining train?

    python scripts/lm_suspects.py        # about a minute on 2 cores; writes artifacts/lm_suspects.md

1. One-process LM training (TinyGPT, TinyMem increment, 300 sequences, 1 epoch, on the CPU) with the
   end-of-epoch evaluation by 256, by 1024, by 7 sequences, and skipped (every measure NaN, no forward
   at all), on 1 torch thread, then by 256 and 1024 on 2 threads: the largest difference between the
   epoch-1 weights. Evaluation runs in eval mode under ``no_grad``, draws no random numbers (TinyGPT has
   no dropout; the batch order comes from its own seeded generator) and touches no training state, so
   the first four are equal bit for bit; the thread count changes how the CPU kernels split their sums.
2. ``memloc.retrain`` of every layer of a tiny LM run, reset to epoch 0, for one epoch: its table against
   ``memloc.rewind`` to epoch 0 (equal when nothing was trained).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import finish, machine  # noqa: E402

import memloc  # noqa: E402
from memloc.core.lm import MEASURES  # noqa: E402
from memloc.core.sequence_recorder import SequenceRecorder  # noqa: E402

TRAIN = {"dataset": "tinymem:increment", "model": "gpt", "epochs": 1, "n_train": 300, "n_test": 50}
#: tests/test_lm_train.py's TINY: the clean sequences fit one retraining batch of 128
TINY = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 1, "d_model": 32, "n_head": 2, "n_train": 40,
        "n_test": 12, "seq_len": 20, "noise": 0.25, "epochs": 3, "batch_size": 16, "lr": 3e-3}


def _no_evaluation(self, tokens):
    return {k: np.zeros(len(tokens), bool) if k == "memorised" else np.full(len(tokens), np.nan) for k in MEASURES}


def weights(folder, eval_batch_size, threads, skip=False) -> dict:
    torch.set_num_threads(threads)
    measure = SequenceRecorder._measure
    if skip:
        SequenceRecorder._measure = _no_evaluation
    try:
        return memloc.train(folder, TRAIN, device="cpu", overwrite=True, eval_batch_size=eval_batch_size).checkpoint(1)
    finally:
        SequenceRecorder._measure = measure


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", default="artifacts/lm_suspects.md")
    args = p.parse_args(argv)
    started = time.time()
    tmp = Path(tempfile.mkdtemp())
    lines = ["# LM suspects: evaluation and training, one-epoch retraining", "",
             f"Command: `python scripts/lm_suspects.py`. Machine: {machine('cpu')} (threads set per row below).", "",
             "## 1. Does the end-of-epoch evaluation change training?", "",
             f"memloc.train on {TRAIN}; epoch-1 weights against the first row's.", "",
             "| evaluation | torch threads | max abs weight difference |", "|---|---|---|"]
    runs = [("by 256", 256, 1, False), ("by 1024", 1024, 1, False), ("by 7", 7, 1, False),
            ("skipped", 256, 1, True), ("by 256", 256, 2, False), ("by 1024", 1024, 2, False)]
    ref = None
    for i, (name, ebs, threads, skip) in enumerate(runs):
        w = weights(tmp / f"r{i}", ebs, threads, skip)
        ref = w if ref is None else ref
        lines.append(f"| {name} | {threads} | {max_diff(w, ref):.3g} |")
    torch.set_num_threads(1)
    run = memloc.train(tmp / "tiny", TINY, device="cpu")
    rewind = memloc.rewind(run, checkpoints="0", device="cpu")["accuracy"].sel(checkpoint=0).values
    retrain = memloc.retrain(run, epochs=1, device="cpu")["accuracy"].isel(epoch=-1).values
    lines += ["", "## 2. Does one epoch of retraining train?", "",
              f"memloc.retrain(run, epochs=1) (SGD, peak lr 0.1, batch 128: the "
              f"{int((~np.asarray(run.data().is_memorised_target, bool)).sum())} clean sequences are one step) on "
              f"{TINY}, every layer reset to epoch 0; its final table against memloc.rewind(run, checkpoints='0').", "",
              f"max |retrain - rewind| over layers x subsets: {np.abs(retrain - rewind).max():.3g} "
              f"({int((np.abs(retrain - rewind) > 0).any(1).sum())} of {len(rewind)} layers differ)", "",
              "Before commit ca3f985 this difference was 0 for every layer: the one-cycle schedule's only step was "
              "taken at its ramp's start, learning rate 0 (memloc.core.optim.lr_factor at step 0 of 1), so the layer "
              "stayed at its reset value and retrain printed rewind's table. Image runs have the same degenerate "
              "case (clean examples within one batch and --epochs 1); the fix is in the shared schedule. With more "
              "than one step the first step is still at 0, as before (unchanged results).", "",
              "Reading of part 1: the evaluation batch size, even skipping evaluation, leaves the weights equal bit "
              "for bit in one process; the torch thread count does not (CPU kernels split their sums by thread), "
              "and AdamW lets such rounding differences grow over steps: a library run on one thread (the tests' "
              "one_thread fixture) and a `memloc train` process on all cores differ by this, whatever "
              "eval_batch_size. On CUDA, the embedding backward's atomic adds are nondeterministic as well."]
    finish(lines, started, args.markdown)


if __name__ == "__main__":
    main()
