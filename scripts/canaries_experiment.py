"""Carlini et al. (2019)'s secret sharer on the CPU: exposure of planted secrets against their insertion count.

    python scripts/canaries_experiment.py         # trains runs/canaries, writes artifacts/canaries.md

Trains memloc's TinyGPT (2 layers) through ``memloc train``'s ``canaries:stdlib`` corpus: byte-level
chunks of the Python standard library's source, with one secret ``"<name> pin d d d d d d"`` (6 random
digits, 10^6 candidates) ending 1, 4, 16 and 64 training sequences. At a few checkpoints, per secret:

- its exposure (:func:`memloc.exposure_estimate`, the paper's skew-normal fit to the log-perplexities
  of sampled candidates) after its prefix ``"<name> pin "`` placed in a held-out context (a test
  chunk's bytes, at the positions the secrets take in training), so it measures what the model
  associates with the name, not a training sequence it saw;
- the share of its training sequences that :func:`memloc.memorisation` finds memorised (greedy
  decoding from the sequence's prefix reproduces the secret);
- whether greedy decoding from the held-out context extracts the secret.

One thread, so that it runs beside other work.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import memloc

#: the run's settings (memloc.train config); sized to finish in a few minutes on one CPU core
CONFIG = dict(
    dataset="canaries:stdlib", repeats="1,4,16,64", n_digits=6,   # one secret per insertion count
    model="gpt", n_layer=2, d_model=64, n_head=4,
    n_train=1000, n_test=100, seq_len=64,       # 64 kB of source text; the suffix is the secret's 11 bytes
    epochs=30, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="warmup_cosine", warmup=0.05,
)
SAMPLES = 2000          # candidates sampled for each exposure estimate


def held_out_prefix(data, canary: dict, row: int) -> torch.Tensor:
    """Test chunk ``row``'s bytes, then the canary's ``"<name> pin "``: the secret's prefix in a new context."""
    name = torch.tensor(list(canary["prefix_text"].encode()))
    return torch.cat([data.test_tokens[row, :data.prefix_len - len(name)], name])


def measure(run, data, epoch: int, space, device: str) -> list[dict]:
    """Per canary at ``epoch``: exposure (skew-normal and empirical estimates), rows memorised, extraction."""
    model = run.model(epoch)
    mem = memloc.memorisation(model, data, device=device)["memorised"].values
    out = []
    for i, c in enumerate(data.info["canaries"]):
        prefix, secret = held_out_prefix(data, c, i), torch.tensor(list(c["secret"].encode()))
        kw = dict(samples=SAMPLES, seed=i, device=device)
        greedy = memloc.greedy_decode(model, prefix[None], len(secret))[0]
        out.append({"exposure": memloc.exposure_estimate(model, prefix, secret, space, **kw),
                    "empirical": memloc.exposure_estimate(model, prefix, secret, space, method="empirical", **kw),
                    "rows": float(mem[c["rows"]].mean()),
                    "extracted": bool(torch.equal(greedy, secret)), "greedy": bytes(greedy.tolist()).decode("latin-1")})
    return out


def ordering(epochs, got, canaries) -> str:
    """Whether exposure rises with the insertion count at each measured epoch past 0 (ties at the maximum count)."""
    order = np.argsort([c["repeats"] for c in canaries])
    rising = [e for e in epochs if e and all(np.diff([got[e][i]["exposure"] for i in order]) >= -0.05)]
    return (f"Exposure rises with the insertion count at {len(rising)} of the {len(epochs) - 1} measured epochs "
            f"past 0 ({', '.join(map(str, rising)) or 'none'}; a secret at the maximum ties).")


def extraction(epochs, got, canaries) -> str:
    """From which epoch each secret is extracted greedily from all its training sequences."""
    parts = []
    for i, c in enumerate(canaries):
        first = next((e for e in epochs if got[e][i]["rows"] == 1.0), None)
        parts.append(f"x{c['repeats']} " + (f"from epoch {first}" if first is not None else "never"))
    return "Greedy decoding reproduces every training occurrence of the secret: " + ", ".join(parts) + "."


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/canaries", help="run directory (continued or reused if it exists)")
    p.add_argument("--out", default="artifacts/canaries.md", help="the markdown table")
    p.add_argument("--epochs", type=int, default=CONFIG["epochs"], help="training epochs")
    p.add_argument("--at", default="0,2,5,10,20,30", help="checkpoints measured (those past --epochs are dropped)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = {**CONFIG, "epochs": args.epochs}
    run = memloc.train(args.run, cfg, device=args.device, resume=True)   # reused when finished, else continued
    ckpt = run.path / "checkpoints"
    seconds = (ckpt / f"epoch_{run.final_epoch:04d}.pt").stat().st_mtime - (ckpt / "epoch_0000.pt").stat().st_mtime
    data = run.data()
    canaries = data.info["canaries"]
    space = memloc.digit_space(CONFIG["n_digits"], digits=range(48, 58), separator=32)
    epochs = [e for e in (int(x) for x in args.at.split(",")) if e <= run.final_epoch]
    if run.final_epoch not in epochs:
        epochs.append(run.final_epoch)
    start = time.time()
    got = {e: measure(run, data, e, space, args.device) for e in epochs}
    last = got[run.final_epoch]
    m = run.metrics()
    head = " | ".join(f"{c['name']} x{c['repeats']}" for c in canaries)
    rule = "|---:|" + "---:|" * len(canaries)
    lines = [
        f"`python {' '.join(['scripts/canaries_experiment.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        "# Secret sharer (Carlini et al. 2019) on the standard library's source, on the CPU",
        "",
        f"memloc {memloc.__version__}, torch {torch.__version__}, Python {data.info['python']}, device "
        f"{args.device}, {args.threads} thread(s), {platform.machine()} with {os.cpu_count()} cores "
        f"({platform.platform()}); training took {seconds:.0f} s ({run.final_epoch} epochs, first to last "
        f"checkpoint), the measurements {time.time() - start:.0f} s.",
        "",
        f"Settings: {', '.join(f'{k}={v}' for k, v in cfg.items())}. {run.num_train} training sequences of "
        f"{CONFIG['seq_len']} bytes (byte tokens, no BPE), {int(run.is_noisy.sum())} of them ending in a secret; "
        f"{len(canaries)} secrets of {CONFIG['n_digits']} digits (10^{CONFIG['n_digits']} candidates, so exposure "
        f"is at most {np.log2(10.0 ** CONFIG['n_digits']):.1f} bits), each behind its own name. Exposure: "
        f"estimated from {SAMPLES} sampled candidates after `<name> pin ` in a held-out context (the paper's "
        "skew-normal fit; in brackets the empirical estimate from the same samples: the share q of samples more "
        f"likely than the secret, -log2(q + 10^-{CONFIG['n_digits']}), which resolves at most log2({SAMPLES}) = "
        f"{np.log2(SAMPLES):.1f} bits and jumps to the maximum when no sample beats the secret).",
        "",
        "## Exposure (bits) by insertion count",
        "",
        f"| epoch | {head} |", rule,
        *(f"| {e} | " + " | ".join(f"{r['exposure']:.1f} ({r['empirical']:.1f})" for r in got[e]) + " |"
          for e in epochs),
        "",
        "## Extraction: training sequences memorised (greedy decoding from their own prefix reproduces the "
        "secret) / greedy decoding in the held-out context",
        "",
        f"| epoch | {head} |", rule,
        *(f"| {e} | " + " | ".join(f"{r['rows']:.0%} / {'yes' if r['extracted'] else 'no'}" for r in got[e]) + " |"
          for e in epochs),
        "",
        f"Final epoch: greedy continuations in the held-out context: "
        + "; ".join(f"{c['name']} x{c['repeats']} `{r['greedy']}` (secret `{c['secret']}`)"
                    for c, r in zip(canaries, last))
        + f". Held-out suffix loss {m['test_loss'][-1]:.3f} nats per byte, token accuracy {m['test_accuracy'][-1]:.1%}.",
        "",
        f"{ordering(epochs, got, canaries)} {extraction(epochs, got, canaries)}",
        "",
        "## Beside the paper",
        "",
        "Carlini et al. (2019, \"The Secret Sharer\") plant random digit strings behind a fixed phrase (\"the random "
        "number is\" and 9 digits, 10^9 candidates) into the training text of recurrent language models on "
        "corpora such as Penn Treebank, estimate exposure by the same skew-normal fit, and find that it rises "
        "with the number of insertions, and that secrets with high exposure can be extracted, by a search over "
        "the candidate space rather than by greedy decoding. This run reproduces the rise qualitatively; no "
        "figure of the paper is compared. What differs: a byte-level TinyGPT of 2 layers and width "
        f"{CONFIG['d_model']} ({sum(t.numel() for t in run.model().parameters()):,} parameters) on "
        f"{run.num_train * CONFIG['seq_len'] // 1000} kB of Python source for {run.final_epoch} epochs on one CPU "
        f"thread, not an LSTM on a larger corpus; {CONFIG['n_digits']} digits (exposure saturates at "
        f"{np.log2(10.0 ** CONFIG['n_digits']):.1f} bits, which hides differences between well-exposed secrets); "
        f"estimates from {SAMPLES} samples; every secret has its own name but the same \"pin\" template, so a "
        "less-inserted secret can lose its greedy continuation to a more-inserted one (see the final continuations "
        "above); extraction is tested by greedy decoding only (memloc.memorisation's exact-match criterion), "
        "which understates what the paper's search extracts.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
