"""Example-tied dropout on MNIST-5k with 10% label noise: p_gen x p_mem grid and baselines.

For every configuration a model is trained with ``memloc.train`` (dropout layers inserted after
``--etd-after``) and evaluated with :func:`memloc.dropout.evaluate_modes`:

* ``train`` mode: each training example through its own training-time mask (what was memorised);
* ``test``  mode: memorisation units scaled by p_mem (the usual evaluation);
* ``drop``  mode: memorisation units zeroed, generalisation units rescaled.

Baselines at each p_gen: standard (element-wise) dropout with p = 1 - p_gen (``drop`` zeroes
the same units as example-tied dropout and rescales the rest by 1 / p_gen), a fixed sparse mask
keeping the first floor(p_gen * C) units in every mode, and the plain model without dropout.

    python scripts/etd_experiment.py          # lenet width 4: ~11 runs, ~30 min on 1 shared CPU core
    python scripts/etd_experiment.py --p-gen 0.4 --p-mem 0.1 --no-baselines --out /tmp/x.md

Writes a Markdown table (and the raw numbers as JSON beside it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memloc.dropout import EVAL_MODES, evaluate_modes
from memloc.run import SUBSETS, accuracies
from memloc.train import train

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lenet")
    p.add_argument("--width", type=int, default=4, help="lenet width multiplier / resnet9 base width")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--etd-after", default="features.1,features.4,classifier.1,classifier.3",
                   help="modules followed by dropout (default: every ReLU of lenet)")
    p.add_argument("--p-gen", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--p-mem", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--no-baselines", action="store_true", help="only the example-tied dropout grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=None, help="directory for the run directories (default: temporary)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "etd_experiment.md"))
    return p.parse_args(argv)


def run_one(runs: Path, name: str, cfg: dict) -> dict:
    t = time.time()
    run = train(runs / name, cfg)
    model, data = run.model(), run.data()
    if cfg.get("etd_after"):
        acc = evaluate_modes(model, data)
    else:  # plain model: the same number in every column
        a = accuracies(model, data)
        acc = np.array([[a[s] for s in SUBSETS]] * len(EVAL_MODES))
        acc[0, 3] = np.nan
    row = {"name": name, "kind": cfg.get("etd_kind", "example_tied") if cfg.get("etd_after") else "none",
           "p_gen": cfg.get("p_gen"), "p_mem": cfg.get("p_mem"), "seconds": round(time.time() - t, 1),
           "acc": {m: dict(zip(SUBSETS, map(float, r))) for m, r in zip(EVAL_MODES, acc)}}
    print(f"{name}: {format_row(row)}  ({row['seconds']} s)", flush=True)
    return row


def accept(row) -> bool:
    """The issue's acceptance: after drop, noisy <= 10%, clean falls <= 5 points, test not lower."""
    t, d = row["acc"]["test"], row["acc"]["drop"]
    return d["noisy"] <= 0.10 and t["clean"] - d["clean"] <= 0.05 and d["test"] >= t["test"]


def format_row(row) -> str:
    a = row["acc"]
    pct = lambda v: "-" if v is None or np.isnan(v) else f"{100 * v:.1f}"
    cells = [pct(a["train"]["noisy"]), pct(a["test"]["clean"]), pct(a["test"]["noisy"]), pct(a["test"]["test"]),
             pct(a["drop"]["clean"]), pct(a["drop"]["noisy"]), pct(a["drop"]["noisy_true"]), pct(a["drop"]["test"]),
             f"{100 * (a['drop']['clean'] - a['test']['clean']):+.1f}", f"{100 * (a['drop']['test'] - a['test']['test']):+.1f}"]
    return " | ".join(cells)


HEADER = ("| method | p_gen | p_mem | train-mode noisy | test clean | test noisy | test test | drop clean | "
          "drop noisy | drop noisy (true label) | drop test | Δ clean | Δ test | accepted |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = {"dataset": "mnist5k", "noise": 0.1, "model": args.model, "epochs": args.epochs, "seed": args.seed}
    if args.width is not None:
        base["width"] = args.width
    tmp = tempfile.TemporaryDirectory() if args.runs is None else None
    runs = Path(args.runs or tmp.name)
    rows, t0 = [], time.time()
    for p_gen in args.p_gen:
        for p_mem in args.p_mem:
            rows.append(run_one(runs, f"etd_g{p_gen}_m{p_mem}",
                                {**base, "etd_after": args.etd_after, "p_gen": p_gen, "p_mem": p_mem}))
    if not args.no_baselines:
        for p_gen in args.p_gen:
            for kind in ("standard", "fixed"):
                rows.append(run_one(runs, f"{kind}_g{p_gen}",
                                    {**base, "etd_after": args.etd_after, "etd_kind": kind, "p_gen": p_gen}))
        rows.append(run_one(runs, "plain", base))
    total = time.time() - t0
    names = {"example_tied": "example-tied", "standard": "standard dropout", "fixed": "fixed sparse",
             "none": "no dropout"}
    lines = [
        "# Example-tied dropout on MNIST-5k, 10% symmetric label noise",
        "",
        f"Command: `python scripts/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Model `{args.model}`" + (f" (width {args.width})" if args.width else "") +
        f", {args.epochs} epochs (memloc.train defaults otherwise), dropout after `{args.etd_after}`, "
        f"seed {args.seed}; 4,000 training examples (400 noisy), 1,000 test. "
        f"Total {total / 60:.1f} min on {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}.",
        "",
        "Accuracies in percent. *train-mode noisy*: noisy examples w.r.t. their given (wrong) labels, each "
        "seen through its own training mask (what the network memorised). *test*: memorisation units "
        "scaled by p_mem (standard dropout: identity). *drop*: memorisation units zeroed, generalisation "
        "units rescaled by (p_gen + p_mem) / p_gen (standard dropout: the same units zeroed, the rest "
        "scaled by 1 / p_gen; fixed sparse and no dropout: every mode identical; standard dropout's train mode is random). Δ = drop - test. *accepted*: the issue's "
        "criterion (drop noisy <= 10%, Δ clean >= -5 points, Δ test >= 0).",
        "",
        HEADER,
    ]
    for r in rows:
        lines.append(f"| {names[r['kind']]} | {r['p_gen'] if r['kind'] != 'none' else '-'} | "
                     f"{r['p_mem'] if r['kind'] == 'example_tied' else '-'} | {format_row(r)} | "
                     f"{'yes' if r['kind'] == 'example_tied' and accept(r) else ('no' if r['kind'] == 'example_tied' else '')} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
