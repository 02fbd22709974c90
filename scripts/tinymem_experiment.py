"""A TinyMem-style run on the CPU: how much of the noise a 2-layer GPT memorises while it learns the rule.

    python scripts/tinymem_experiment.py            # trains runs/tinymem, writes artifacts/tinymem.md

Trains memloc's TinyGPT (2 layers) on TinyMem's increment sequences (x -> x + 7) with 10% noisy
training sequences (suffix digits shifted by +-1) through ``memloc.train`` -- the run directory
every memloc analysis reads -- and tabulates per epoch, from ``run.h5``, the memorised share of the
noisy sequences (greedy decoding from the prefix reproduces the corrupted suffix), of the clean ones,
and the held-out rule accuracy (the share of held-out sequences whose greedy suffix is exactly the
rule's) and token accuracy. The last epoch's noisy share is checked against real greedy generation
(:func:`memloc.greedy_decode`). One thread, so that it runs beside other work.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import memloc

#: the run's settings (memloc.train config); sized to finish in a few minutes on one CPU core
CONFIG = dict(
    dataset="tinymem:increment",   # TinyMem's main task: x_{i+1} = x_i + 7, digits and spaces (14 symbols)
    model="gpt", n_layer=2, d_model=64, n_head=4,
    n_train=1000, n_test=200, seq_len=32, prefix_len=16,   # suffix: the last 16 tokens (2-3 values)
    noise=0.1,                     # 100 noisy sequences: each suffix digit shifted with probability 0.1
    epochs=60, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="warmup_cosine", warmup=0.05,
)
#: TinyMem's reported share of noisy sequences memorised (Sakarvadia et al., ICLR 2025, as cited in issue 23)
TINYMEM_NOISE_MEMORISED = "35-60%"


def table(m: dict, every: int) -> list[str]:
    rows = ["| epoch | noisy memorised | clean memorised | held-out rule accuracy | held-out token accuracy "
            "| held-out suffix loss |", "|---:|---:|---:|---:|---:|---:|"]
    last = len(m["noisy_memorised"]) - 1
    for e in range(last + 1):
        if e % every and e != last:
            continue
        rows.append(f"| {e} | {m['noisy_memorised'][e]:.1%} | {m['clean_memorised'][e]:.1%} | "
                    f"{m['test_rule_accuracy'][e]:.1%} | {m['test_accuracy'][e]:.1%} | {m['test_loss'][e]:.3f} |")
    return rows


def _first(values, at_least: float):
    hits = np.flatnonzero(np.asarray(values) >= at_least)
    return int(hits[0]) if len(hits) else None


def timing(m: dict) -> str:
    """When the rule is learnt and when the noise is memorised, read from the table."""
    rule = _first(m["test_rule_accuracy"], 0.5)
    top = float(np.nanmax(m["noisy_memorised"]))
    noise = _first(m["noisy_memorised"], top / 2) if top > 0 else None
    text = (f"The held-out rule accuracy first reaches 50% at epoch {rule}" if rule is not None
            else "The held-out rule accuracy never reaches 50%")
    if noise is None:
        return text + "; no noisy sequence is memorised."
    tail = m["noisy_memorised"][-11:]
    return (text + f", while the noisy share reaches half of its peak of {top:.1%} only at epoch {noise}: the rule is "
            f"learnt first and the noise memorised late, as the learning rate decays (over the last "
            f"{len(tail) - 1} epochs the noisy share went from {tail[0]:.1%} to {tail[-1]:.1%}).")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/tinymem", help="run directory (continued or reused if it exists)")
    p.add_argument("--out", default="artifacts/tinymem.md", help="the markdown table")
    p.add_argument("--epochs", type=int, default=CONFIG["epochs"], help="training epochs")
    p.add_argument("--every", type=int, default=5, help="table row every this many epochs (and the last)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = {**CONFIG, "epochs": args.epochs}
    # a finished run with these settings is reused, an interrupted one continued (bit-identically)
    run = memloc.train(args.run, cfg, device=args.device, resume=True)
    ckpt = run.path / "checkpoints"
    seconds = (ckpt / f"epoch_{run.final_epoch:04d}.pt").stat().st_mtime - (ckpt / "epoch_0000.pt").stat().st_mtime
    m = run.metrics()
    data = run.data()
    noisy = np.flatnonzero(run.kind == "noisy")
    generated = memloc.greedy_decode(run.model(), data.prefixes[noisy], data.suffix_len)
    greedy = float((generated == data.suffixes[noisy]).all(1).double().mean())
    peak = int(np.nanargmax(m["noisy_memorised"]))
    settings = ", ".join(f"{k}={v}" for k, v in cfg.items())
    lines = [
        f"`python {' '.join(['scripts/tinymem_experiment.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        "# TinyMem-style memorisation of noise on the CPU",
        "",
        f"memloc {memloc.__version__}, torch {torch.__version__}, device {args.device}, {args.threads} thread(s); "
        f"training took {seconds:.0f} s ({len(m['noisy_memorised']) - 1} epochs, first to last checkpoint).",
        "",
        f"Settings: {settings}. {int(run.is_noisy.sum())} of {run.num_train} training sequences are noisy (their "
        f"suffix breaks the rule); {len(data.test_tokens)} held-out sequences are clean. A sequence counts as "
        "memorised when greedy decoding from its 16-token prefix reproduces its 16-token suffix exactly "
        "(recorded each epoch from one teacher-forced pass); the held-out rule accuracy is the same test on "
        "held-out sequences, where the exact suffix is the rule's continuation.",
        "",
        *table(m, args.every),
        "",
        f"Final epoch: {m['noisy_memorised'][-1]:.1%} of the noisy sequences memorised (real greedy generation of "
        f"the final model agrees: {greedy:.1%}), peak {m['noisy_memorised'][peak]:.1%} at epoch {peak}; held-out "
        f"rule accuracy {m['test_rule_accuracy'][-1]:.1%}, token accuracy {m['test_accuracy'][-1]:.1%}.",
        "",
        "## Beside TinyMem",
        "",
        f"Sakarvadia et al. (TinyMem, ICLR 2025) report {TINYMEM_NOISE_MEMORISED} of noisy sequences memorised by "
        f"their small GPT-2-style models on arithmetic sequences of this kind; this run memorises "
        f"{m['noisy_memorised'][-1]:.0%}. What differs: their models (2 to 16 layers) were trained on GPUs for many "
        "more epochs; their noise perturbs whole values anywhere in a sequence, while memloc's shifts suffix "
        "digits only (the prefix is the clean prompt) and memorisation is tested on a fixed 16-token suffix; "
        f"this run is one TinyGPT of 2 layers and width 64 trained for {len(m['noisy_memorised']) - 1} epochs, "
        f"sized to finish in minutes on one CPU core. {timing(m)}",
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
