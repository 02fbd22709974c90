"""Benchmark memloc.flip: the batched search against the one-example-at-a-time reference, side by side.

    python scripts/bench_flip.py [--mlp-run RUN] [--lenet-run RUN] [--sites pre_norm,weight] [--out artifacts/bench_flip.md]

For each model (the MNIST-5k MLP and lenet runs; trained into a temporary directory unless given)
and each site (units at ``pre_norm``; parameter items by the official rule at ``weight``), on the
same examples, reference batch and settings, it times

* ``reference``: ``reference_flip`` of ``tests/test_flip.py`` (units) or ``reference_weight_flip`` of
  ``tests/test_flip_weights.py`` (the official rule item by item), loaded from those files so the
  tests and the benchmark use one reference, one example after the other;
* ``batched``: :class:`memloc.analyses.flip.search.FlipSearch` (or :class:`memloc.analyses.flip.weights.WeightFlipSearch`)
  with ``--group-size`` searches at once;
* ``raw``: a plain training forward+backward (cross-entropy, parameter gradients, no hooks) of
  batches of ``group size x (copies + B)`` rows, the rows one batched step processes;

and reports the speed ratio batched / reference, the batched search's example-steps per second
(one step of one example = one forward/backward of its copies and its reference batch) as a
fraction of the raw throughput in the same unit, and whether the unit sequences were identical.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memloc.analyses.flip.weights import WeightFlipSearch  # noqa: E402
from memloc.core.run import load  # noqa: E402
from memloc.training.train import train  # noqa: E402

flip = importlib.import_module("memloc.analyses.flip")   # the package (``memloc.flip`` is bound to the function)

RUNS = {"mlp": {"model": "mlp"}, "lenet": {"model": "lenet", "epochs": 40}}


def _test_module(name):
    spec = importlib.util.spec_from_file_location(f"memloc_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference(site):
    """(search class, reference(model, structure, x, y, id, rx, ry, ref_ids, dtype=, **kw))."""
    if site == "weight":
        ref = _test_module("test_flip_weights").reference_weight_flip
        return (lambda model, rx, ry, refs, dtype: WeightFlipSearch(model, rx, ry, refs, dtype=dtype),
                lambda model, structure, *a, **kw: ref(model, *a, 0, **kw))
    ref = _test_module("test_flip").reference_flip
    return (lambda model, rx, ry, refs, dtype: flip.FlipSearch(model, rx, ry, refs, site=site, dtype=dtype),
            lambda model, structure, *a, **kw: ref(model, structure, *a, 0, site=site, **kw))


def bench_model(name, run, site, args, ref_batch_size):
    make_search, reference_flip = load_reference(site)
    dtype = flip.DTYPES[args.dtype]
    data, model = run.data(), run.model()
    ids = flip.select_examples(args.examples, run.is_noisy, seed=args.seed)
    refs = flip.reference_batches(np.flatnonzero(~run.is_noisy), ref_batch_size, 1, seed=args.seed)
    r = torch.as_tensor(refs)
    x, y, rx, ry = data.train.x[ids], data.train.y[ids], data.train.x[r], data.train.y[r]
    kw = dict(max_units=args.max_units, noise_samples=args.noise_samples, noise_ratio=args.noise_ratio, seed=args.seed)

    t0, c0 = time.perf_counter(), time.process_time()
    search = make_search(model, rx, ry, refs, dtype)
    ok = (search.predict(x) == y).numpy()
    tasks = [(k, 0) for k in np.flatnonzero(ok)]
    batched = {t.k: (t.units.tolist(), t.flipped)
               for t in search.run(x, y, ids, tasks, group_size=args.group_size, **kw)}
    t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    ref = {k: reference_flip(model, search.structure, x[k], y[k], int(ids[k]), rx[0], ry[0], refs[0],
                             dtype=dtype, **kw) for k, _ in tasks}
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0

    steps = sum(len(u) + 1 for u, _ in batched.values())
    copies = max(args.noise_samples, 1)
    rows = args.group_size * (copies + ref_batch_size)
    net = run.model().to(dtype)      # eval mode, as in the search
    xb = data.train.x[torch.arange(rows) % len(data.train)].to(dtype)
    yb = data.train.y[torch.arange(rows) % len(data.train)]
    for _ in range(2):
        F.cross_entropy(net(xb), yb).backward()
    n_raw, t0 = 0, time.perf_counter()
    while n_raw < 3 or time.perf_counter() - t0 < 2.0:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(xb), yb).backward()
        n_raw += 1
    t_raw = (time.perf_counter() - t0) / n_raw
    same = sum(batched[k] == (ref[k][0], ref[k][1]) for k, _ in tasks)
    # rows the batched search pushed through forward+backward (its target-only checks not counted)
    computed = search.stats["example_steps"] * copies + search.stats["reference_evaluations"] * ref_batch_size
    flipped = [f for _, f in batched.values()]
    return {"model": name, "site": site, "B": ref_batch_size, "flipped": f"{sum(flipped)}/{len(flipped)}",
            "median_items": float(np.median([len(u) for u, _ in batched.values()])) if batched else float("nan"), "examples": len(tasks), "steps": steps,
            "reference_evaluations": search.stats["reference_evaluations"], "reference_s": t_ref,
            "batched_s": t_batched, "speedup": t_ref / t_batched, "cpu_speedup": c_ref / c_batched,
            "batched_steps_per_s": steps / t_batched,
            "raw_steps_per_s": args.group_size / t_raw, "raw_fraction": steps / t_batched / (args.group_size / t_raw),
            "hardware_fraction": computed / t_batched / (rows / t_raw),
            "row_ratio": steps * (copies + ref_batch_size) / computed,
            "identical": f"{same}/{len(tasks)}", "prefix_cached": search.prefix is not None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mlp-run", help="MNIST-5k MLP run (default: train one into a temporary directory)")
    p.add_argument("--lenet-run", help="MNIST-5k lenet run (default: train one, 40 epochs)")
    p.add_argument("--models", default="mlp,lenet")
    p.add_argument("--sites", default="pre_norm,weight", help="comma-separated sites (pre_norm, post_norm, weight)")
    p.add_argument("--examples", default="noisy:50,clean:50")
    p.add_argument("--max-units", type=int, default=100)
    p.add_argument("--ref-batch-sizes", default="64,16", help="comma-separated reference batch sizes B")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--noise-samples", type=int, default=0)
    p.add_argument("--noise-ratio", type=float, default=0.01)
    p.add_argument("--dtype", default="float32", choices=list(flip.DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench_flip.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            given = getattr(args, f"{name}_run")
            run = load(given) if given else train(Path(tmp) / name, RUNS[name], device="cpu")
            for site in args.sites.split(","):
                for b in map(int, args.ref_batch_sizes.split(",")):
                    res = bench_model(name, run, site, args, b)
                    print(json.dumps(res), flush=True)
                    results.append(res)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    lines = ["# memloc.flip benchmark", "",
             f"`python scripts/bench_flip.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
             f"dtype {args.dtype}; settings `{json.dumps(settings)}`.", "",
             "| model | site | B | searches | flipped | median zeroed | example-steps | reference evaluations | row ratio | "
             "reference s | batched s | speed-up | speed-up (CPU time) | batched steps/s | raw fwd+bwd steps/s | "
             "fraction of raw | hardware fraction | identical sequences |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['site']} | {r['B']} | {r['examples']} | {r['flipped']} | {r['median_items']:g} | "
                     f"{r['steps']} | {r['reference_evaluations']} | "
                     f"{r['row_ratio']:.1f} | "
                     f"{r['reference_s']:.2f} | {r['batched_s']:.2f} | {r['speedup']:.1f}x | {r['cpu_speedup']:.1f}x | "
                     f"{r['batched_steps_per_s']:.0f} | "
                     f"{r['raw_steps_per_s']:.0f} | {r['raw_fraction']:.0%} | {r['hardware_fraction']:.0%} | {r['identical']} |")
    lines += ["", "* site: `pre_norm` zeroes units (channels / features, memloc's default); `weight` zeroes parameter "
              "items by the official rule (a conv filter, or one element of any other parameter): conv nets with "
              "per-search masks under `torch.func.vmap` (convs and linear layers on the shared weights), models of "
              "linear layers as one stacked group with per-search corrections; median zeroed counts units or items.",
              "* speed-up: reference wall time over batched wall time, measured one after the other in one process; "
              "speed-up (CPU time): the same with process CPU time, which other jobs on a shared machine disturb less.",
              "* example-step: one forward/backward of one example's copies and its reference batch (copies + B "
              "rows), as the reference implementation does it; the reference does one per zeroed unit plus one.",
              "* raw fwd+bwd steps/s: a plain training forward+backward (parameter gradients, no hooks) of batches "
              "of group-size x (copies + B) rows, divided into example-steps; fraction of raw = batched steps/s over it.",
              "* hardware fraction: rows the batched search pushed through forward+backward per second (target "
              "copies + B per reference evaluation) over the raw rows/s: how well the search uses the hardware "
              "for the work it does (the reference term is memoised per (repeat, set of zeroed units), and the "
              "layers before the first unit layer are computed once per reference batch).",
              "* row ratio: rows the reference pushes through forward+backward over rows the batched search does: "
              "the speed-up to expect where both run at the same per-row speed. The reference's (copies + B)-row "
              "step is already compute-bound on a CPU, so beyond this ratio only the cached first layer and "
              "BLAS efficiency add speed; exact per-example reference terms forbid sharing more. The weight site on "
              "a dense model shares no reference term (row ratio 1) but does less per row: the first layer's "
              "reference rows once, and only the rows of large linear weights whose Cauchy-Schwarz bound reaches "
              "the best score get exact scores."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
