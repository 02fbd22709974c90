"""Where the time of ``memloc retrain`` goes, layer by layer: each layer's retraining timed alone
(one process, one torch thread), split into its training steps and its per-epoch evaluations.

Why: under torchrun, ranks claim whole layers (memloc/analyses/retrain.py); if one layer costs more
than half of the work, no split of whole layers can reach a 2-process speed-up above
total / that layer. Since the per-epoch evaluations are handed off to free ranks
(memloc/scale/handoff.py), the bound is set by the costliest layer's training steps alone. Usage: ``python scripts/retrain_layer_times.py --run RUN [--epochs 10]``.
"""
from __future__ import annotations

import argparse
import time

import torch

import memloc.analyses.retrain as mod
from memloc.analyses.retrain import retrain_layer
from memloc.core.selection import prepare


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a trained image run (e.g. lenet on mnist5k)")
    ap.add_argument("--epochs", type=int, default=10, help="retraining epochs (bench_shard uses 10)")
    ap.add_argument("--device", default="cpu", help="auto|cpu|cuda")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = prepare(args.run, None, device=args.device, checkpoints="final")
    init = p.run.checkpoint(0)
    spent = {"eval": 0.0}
    original = mod._Retraining.row

    def timed_row(*a, **k):      # retrain_layer's per-epoch evaluation, timed
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent["eval"] += time.perf_counter() - t

    mod._Retraining.row = timed_row
    rows = []
    try:
        for layer in p.layers:
            spent["eval"] = 0.0
            t = time.perf_counter()
            retrain_layer(p.model, init, layer, p.data, epochs=args.epochs)
            rows.append((layer.name, time.perf_counter() - t, spent["eval"]))
    finally:
        mod._Retraining.row = original
    total = sum(r[1] for r in rows)
    print("| layer | seconds | share of the work | of which evaluation s |\n|---|---|---|---|")
    for name, sec, ev in rows:
        print(f"| {name} | {sec:.2f} | {sec / total:.0%} | {ev:.2f} |")
    biggest = max(r[1] for r in rows)
    print(f"\ntotal {total:.2f} s; the costliest layer is {biggest / total:.0%} of it: whole-layer claiming "
          f"can reach at most {total / max(biggest, total / 2):.2f}x on 2 processes")
    steps = max(r[1] - r[2] for r in rows)
    print(f"its training steps alone are {steps / total:.0%}: with the evaluations handed off, at most "
          f"{total / max(steps, total / 2):.2f}x")


if __name__ == "__main__":
    main()
