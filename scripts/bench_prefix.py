"""Benchmark the frozen-prefix reuse of memloc.rewind and memloc.retrain: on against off, side by side.

    python scripts/bench_prefix.py [--mlp-run RUN] [--lenet-run RUN] [--out artifacts/bench_prefix.md]

For each model (the MNIST-5k MLP and lenet runs; trained into a temporary directory unless given),
in one process, on the same run, checkpoints and settings, it times :func:`memloc.rewind` and
:func:`memloc.retrain` with ``prefix_cache=False`` (every pass runs the whole model) and ``True``
(what runs before the changed layer is computed once; :mod:`memloc.scale.prefix`), alternating the two
``--repeats`` times and keeping each one's fastest time, and checks that the saved arrays
(``accuracy``, ``baseline``) are identical. Times are also given in units of one raw pass: one
evaluation of the final model on the train and test sets (``memloc.core.evaluate.accuracy_row``),
measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _markdown import cpu_name, finish  # noqa: E402
from memloc.core.evaluate import accuracy_row  # noqa: E402
from memloc.scale.prefix import PrefixCache  # noqa: E402
from memloc.analyses.retrain import retrain  # noqa: E402
from memloc.analyses.rewind import rewind  # noqa: E402
from memloc.core.run import load  # noqa: E402
from memloc.training.train import train  # noqa: E402
from memloc.core.units import trace  # noqa: E402

RUNS = {"mlp": {"model": "mlp"}, "lenet": {"model": "lenet", "epochs": 40}}


def get_run(name: str, args, tmp: str):
    """The run given by ``--NAME-run``, else one trained with :data:`RUNS` ``[name]`` under ``tmp``."""
    given = getattr(args, f"{name}_run")
    return load(given) if given else train(Path(tmp) / name, RUNS[name], device="cpu")


def raw_pass_seconds(run) -> float:
    """Fastest of a few plain evaluations of the final model (train + test sets)."""
    model, data = run.model(), run.data()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        accuracy_row(model, data)
        times.append(time.perf_counter() - t0)
    return min(times)


def timed_pair(call, repeats: int):
    """Fastest time of ``call(prefix_cache)`` for off and on (alternating), their results."""
    best, results = {False: float("inf"), True: float("inf")}, {}
    for _ in range(repeats):
        for pc in (False, True):
            t0 = time.perf_counter()
            results[pc] = call(pc)
            best[pc] = min(best[pc], time.perf_counter() - t0)
    return best, results


def bench_model(name, run, args):
    data, model = run.data(), run.model()
    layers = trace(model, data.train.x[:2]).layers
    cuts = PrefixCache(model, layers, data).cuts
    cut = f"{sum(c is not None for c in cuts)}/{len(layers)}"
    raw = raw_pass_seconds(run)
    analyses = {
        "rewind": (f"checkpoints {args.checkpoints}",
                   lambda pc: rewind(run, checkpoints=args.checkpoints, device="cpu", prefix_cache=pc)),
        "retrain": (f"{args.retrain_epochs} epochs",
                    lambda pc: retrain(run, epochs=args.retrain_epochs, device="cpu", prefix_cache=pc)),
    }
    out = []
    for analysis, (settings, call) in analyses.items():
        best, res = timed_pair(call, args.repeats)
        same = all(np.array_equal(res[False][k].values, res[True][k].values, equal_nan=True)
                   for k in ("accuracy", "baseline"))
        out.append({"model": name, "analysis": analysis, "settings": settings, "layers": len(layers), "cut": cut,
                    "plain_s": best[False], "reuse_s": best[True], "speedup": best[False] / best[True],
                    "raw_pass_s": raw, "identical": bool(same)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None):
    started, load_before = time.time(), os.getloadavg()[0]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mlp-run", help="MNIST-5k MLP run directory (default: train one into a temporary directory)")
    p.add_argument("--lenet-run", help="MNIST-5k lenet run directory (default: train one, 40 epochs)")
    p.add_argument("--models", default="mlp,lenet", help="comma-separated models to benchmark (mlp, lenet)")
    p.add_argument("--checkpoints", default="all", help="checkpoints to rewind to (memloc rewind --checkpoints)")
    p.add_argument("--retrain-epochs", type=int, default=10, help="retraining epochs per layer")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each mode, alternating (the fastest is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench_prefix.md"), help="Markdown file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = [row for name in args.models.split(",") for row in bench_model(name, get_run(name, args, tmp), args)]
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    lines = ["# memloc frozen-prefix reuse benchmark (rewind, retrain)", "",
             f"`{' '.join(['python scripts/bench_prefix.py', *(sys.argv[1:] if argv is None else argv)])}` on "
             f"{cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), float32, CPU; settings "
             f"`{json.dumps(settings)}`; runs: MNIST-5k, 10% symmetric noise, mlp 30 epochs, lenet 40 epochs "
             f"(memloc.train defaults otherwise). Load average {load_before:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores shared with other work: each time "
             "is the fastest of the alternating runs.", "",
             "| model | analysis | settings | layers cut | plain s | reuse s | speed-up | raw pass ms | "
             "plain / raw pass | reuse / raw pass | identical arrays |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['analysis']} | {r['settings']} | {r['cut']} | {r['plain_s']:.2f} | "
                     f"{r['reuse_s']:.2f} | {r['speedup']:.2f}x | {r['raw_pass_s'] * 1e3:.0f} | "
                     f"{r['plain_s'] / r['raw_pass_s']:.0f} | {r['reuse_s'] / r['raw_pass_s']:.0f} | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    lines += ["", "* plain: `prefix_cache=False` (the whole model in every pass); reuse: `prefix_cache=True` (the "
              "default): the input of each layer's cut is computed once for the whole dataset and every pass runs "
              "the model from there. Both include loading the run and checkpoints, tracing and (reuse) building "
              "and checking the cache.",
              "* layers cut: layers whose prefix is reused (the first layer has nothing with weights before it).",
              "* raw pass: one plain evaluation of the final model on the train and test sets (5,000 examples, "
              "batches of 1024), fastest of 3; plain / reuse over raw pass: each time in such passes.",
              "* identical arrays: `accuracy` and `baseline` of the two results compared with `np.array_equal`."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    finish(lines, started, args.out)


if __name__ == "__main__":
    main()
