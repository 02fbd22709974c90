"""How the cost of each analysis grows with the training set and the model width.

    python scripts/bench_scale.py [--model mlp|lenet] [--sizes 1000,2000,4000,8000,16000] [--widths 1,2,4]
                                  [--width-n 4000] [--epochs 3] [--quick] [--out artifacts/bench_scale.md]

The data: MNIST-5k's 4,000 training images and three copies shifted by 2 pixels (down, right,
up-left; zeros shifted in), 16,000 examples, of which a seeded permutation's first N are kept
(``bench_scale:mnist_shifted_N``, a dataset factory memloc rebuilds in any process), with 10%
symmetric label noise (exactly floor(0.1 N) labels) and MNIST-5k's 1,000 test images. The model:
``bench_scale:mlp`` (MNIST-5k's MLP with both hidden layers 512 x width wide) or ``lenet`` (its
``width`` channel multiplier).

For every N of ``--sizes`` (width 1) and every width of ``--widths`` (N = ``--width-n``) it trains
a run for ``--epochs`` epochs and then runs gradients (every checkpoint), rewind (every
checkpoint), retrain (``--retrain-epochs``), flip (``--flip-examples``; cost per search and per
example-step), scores (all) and detect, each in a fresh process (``--worker``) that reports its
wall time (the analysis call only: after Python, torch and the run's data and model are loaded;
``load`` is that loading) and its peak resident memory (``resource.getrusage`` max RSS; on CUDA
``torch.cuda.max_memory_allocated``). Exponents are least-squares slopes of log time on log N
(all sizes, and the largest three) and on log width; ``expected`` is the slope of the work the
analysis does (forward-pass equivalents counted from its settings: :func:`work`), so fixed costs
such as the 1,000 test images evaluated in every pass show up as expected sub-linearity. Then flip
and rewind at the largest N run in 1 process and under torchrun with ``--procs`` (1 thread each),
by :func:`bench_shard.compare`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(SCRIPTS)]

MARK = "BENCH_SCALE_RESULT "
ANALYSES = ("train", "gradients", "rewind", "retrain", "flip", "scores", "detect")
TEST = 1000          # MNIST-5k test images, evaluated beside the training set in every accuracy pass
SHIFTS = ((0, 0), (2, 0), (0, 2), (-2, -2))   # (down, right) pixels of the four copies
QUICK = dict(sizes="400,800,1600", widths="1,2", width_n=400, epochs=2, retrain_epochs=1, flip_examples="any:16",
             max_units=20, shard_flip_examples="any:32", shard_repeats=1, shard_startup=False)


# ----------------------------------------------------------------------------- data and model factories
def mnist_shifted(n: int):
    """A :class:`memloc.Data` of ``n`` (at most 16,000) images: the first ``n`` of a seeded order of
    MNIST-5k's 4,000 training images and their copies shifted by :data:`SHIFTS` (only those are made)."""
    import torch
    import torch.nn.functional as F
    from memloc.core.data import _standardise, load_arrays, make_data
    x, y, x_te, y_te, *_ = load_arrays("mnist5k")
    total = len(SHIFTS) * len(y)
    if not 0 < n <= total:
        raise ValueError(f"mnist_shifted: n must be in 1..{total}, got {n}")
    rows = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]
    copy, image, p = rows // len(y), rows % len(y), 2
    padded = F.pad(torch.from_numpy(x)[image], (p, p, p, p))
    xs = torch.empty(n, *x.shape[1:])
    for c, (dy, dx) in enumerate(SHIFTS):
        mine = copy == c
        xs[mine] = padded[mine][:, :, p - dy:p - dy + 28, p - dx:p - dx + 28]
    xt, xe = _standardise(xs, torch.from_numpy(x_te))
    return make_data(xt, y[image.numpy()], xe, y_te, num_classes=10, name=f"mnist_shifted_{n}")


def __getattr__(name: str):
    """``bench_scale:mnist_shifted_N``: the dataset factory of N examples (an import path for memloc)."""
    if name.startswith("mnist_shifted_") and name[len("mnist_shifted_"):].isdigit():
        return functools.partial(mnist_shifted, int(name[len("mnist_shifted_"):]))
    raise AttributeError(name)


def mlp(in_shape, num_classes, width: int = 1):
    """MNIST-5k's MLP (784-512-512-10) with hidden layers ``512 x width`` wide."""
    from memloc.core.models import MLP
    return MLP(in_shape, num_classes, hidden=(512 * width, 512 * width))


MODELS = {"mlp": "bench_scale:mlp", "lenet": "lenet"}


def macs_per_example(model_spec: str, width: int) -> int:
    """Multiply-adds of one forward pass of one 28x28 example (conv and linear layers)."""
    import torch
    from torch import nn
    from memloc.core.models import build_model
    model, total = build_model(model_spec, (1, 28, 28), 10, width=width), [0]

    def count(m, inp, out):
        k = m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
        total[0] += out[0].numel() * k

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


# ----------------------------------------------------------------------------- one measurement per process
def peak_mib() -> float:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10    # bytes on macOS, KiB on Linux


def worker(task: dict) -> dict:
    """Run one analysis of ``task`` in this (fresh) process; its time, peak memory and counts."""
    import torch
    import torch._dynamo  # noqa: F401  (the first torch optimizer imports it: seconds of start-up, not work)
    import memloc
    from memloc.core.runtime import resolve_device
    torch.set_num_threads(task["threads"])
    device = resolve_device(task["device"])
    name, path, out = task["analysis"], task["run"], {}
    t0 = time.perf_counter()
    if name != "train":     # what every analysis loads first: the run, its data and final model
        run = memloc.load(path)
        run.data(device), run.model(device=device)
    load_s, start_mib = time.perf_counter() - t0, peak_mib()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if name == "train":
        memloc.train(path, task["cfg"], device=device, overwrite=True)
    elif name == "gradients":
        memloc.gradients(run, checkpoints="all", device=device)
    elif name == "rewind":
        memloc.rewind(run, checkpoints="all", device=device)
    elif name == "retrain":
        memloc.retrain(run, epochs=task["retrain_epochs"], device=device)
    elif name == "flip":
        res = memloc.flip(run, examples=task["flip_examples"], max_units=task["max_units"], device=device,
                          resume=None)
        n_units = np.asarray(res["n_units"])[np.asarray(res["status"]) == 0]
        out = {"searches": int(n_units.size), "steps": int((n_units + 1).sum())}
    elif name == "scores":
        res = memloc.scores(run, device=device)
    elif name == "detect":
        memloc.detect(run)
    else:
        raise ValueError(f"unknown analysis {name!r}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if name == "scores":    # detect reads it (saved after the timing)
        res.save(run.results_path("scores"))
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {**out, "seconds": seconds, "load_s": load_s, "peak_mib": peak_mib(), "start_mib": start_mib,
            "gpu_peak_mib": gpu}


def measure(task: dict, env: dict, repeats: int) -> dict:
    """``worker(task)`` in ``repeats`` fresh processes: the fastest run's numbers, the largest peak memory."""
    best = None
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], env=env,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode or not lines:
            raise RuntimeError(f"worker {task['analysis']} on {task['run']} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(lines[-1][len(MARK):])
        if best is not None:
            res = min(best, res, key=lambda r: r["seconds"]) | {"peak_mib": max(best["peak_mib"], res["peak_mib"])}
        best = res
    return best


# ----------------------------------------------------------------------------- expected work and fits
def work(analysis: str, n: int, args) -> float:
    """Forward-pass equivalents (forward 1, backward 2) of ``analysis`` at N = ``n`` (its settings as
    in :func:`worker`; layers of the model: ``args.layers``); its slope in log N is the expected exponent."""
    e, layers, clean = args.epochs, args.layers, n - math.floor(0.1 * n)
    return {
        "load": n,                                         # the data kept (plus fixed costs: not counted)
        "train": 3 * e * n + (e + 1) * (n + TEST),         # e epochs + an evaluation after each and at 0
        "gradients": 5 * (e + 1) * n,                      # fwd + 2 bwd at every checkpoint
        "rewind": ((e + 1) * layers + 1) * (n + TEST),     # every (checkpoint, layer) cell + the baseline
        "retrain": layers * (3 * args.retrain_epochs * clean + (args.retrain_epochs + 1) * (n + TEST)) + n + TEST,
        "flip per search": 1, "flip per step": 1,          # a fixed reference batch: independent of N
        "scores": 3 * (e + 1) * n + n,                     # grand, tracin (every epoch): fwd+bwd; el2n: fwd
        "detect": n,
    }[analysis]


def slope(xs, ys) -> float:
    ok = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0 and np.isfinite(y)]
    if len(ok) < 2:
        return float("nan")
    x, y = np.log([o[0] for o in ok]), np.log([o[1] for o in ok])
    return float(np.polyfit(x, y, 1)[0])


REASONS = {
    "load": "mostly fixed: reading MNIST-5k (5,000 images whatever N) and building the model",
    "train": "fixed per-epoch costs: evaluating the 1,000 test images and writing a checkpoint after every epoch",
    "gradients": "fixed costs: loading the checkpoints and tracing the model",
    "rewind": "every cell also evaluates the 1,000 test images (work N + 1,000); loading checkpoints",
    "retrain": "every epoch's evaluation includes the 1,000 test images (work N + 1,000)",
    "flip per search": "per example: the reference batch is fixed, so no growth is expected; what changes with N "
                       "is how many units a search zeroes (the model at fixed epochs is trained on more steps)",
    "flip per step": "per example-step (one fwd+bwd of the example and its fixed reference batch): no growth "
                     "expected",
    "scores": "fixed costs: loading the checkpoints of every epoch, reading run.h5",
    "detect": "milliseconds: ranking N scores; reading the result file and fixed costs dominate",
}


def note(name: str, e_all: float, e_top: float, expected: float) -> str:
    """The notes column: linear (0.9-1.1 over all sizes or the largest three) or why not."""
    if name.startswith("flip"):
        ok = abs(e_top) <= 0.1 or abs(e_all) <= 0.1
        return f"{'constant' if ok else 'not constant'} per example; {REASONS[name]}"
    if 0.9 <= e_top <= 1.1 or 0.9 <= e_all <= 1.1:
        return "linear"
    if min(e_top, e_all) < 0.9:
        return f"sub-linear (work alone: {expected:.2f}); {REASONS[name]}"
    return (f"super-linear (work alone: {expected:.2f}): slower per example as N grows (data leaving the CPU "
            "caches) or noise; rerun on a quiet machine")


# ----------------------------------------------------------------------------- the driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mlp", choices=list(MODELS))
    p.add_argument("--sizes", default="1000,2000,4000,8000,16000", help="training set sizes N (at most 16000)")
    p.add_argument("--widths", default="1,2,4", help="model widths (at N = --width-n)")
    p.add_argument("--width-n", type=int, default=4000, help="N of the width sweep")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of every run")
    p.add_argument("--retrain-epochs", type=int, default=3)
    p.add_argument("--flip-examples", default="any:64", help="flip's examples (its cost is per search)")
    p.add_argument("--max-units", type=int, default=100)
    p.add_argument("--procs", type=int, default=2, help="processes of the sharded comparison (0: skip it)")
    p.add_argument("--shard-flip-examples", default="any:400", help="flip's examples in the sharded comparison")
    p.add_argument("--shard-repeats", type=int, default=2, help="alternating timings of the sharded comparison")
    p.add_argument("--no-shard-startup", dest="shard_startup", action="store_false",
                   help="skip timing the start-up of the sharded commands (no speed-up of the work)")
    p.add_argument("--repeats", type=int, default=1, help="processes per measurement (the fastest is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every measuring process")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--runs-dir", default="/tmp/bench_scale", help="where the runs are written (replaced)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--note", default="", help="a sentence added to the header (e.g. the state of the machine)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench_scale.md"), help="Markdown file to write")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    try:
        sizes = [int(n) for n in str(args.sizes).split(",")] + [args.width_n]
        widths = [int(w) for w in str(args.widths).split(",")]
    except ValueError:
        p.error("--sizes and --widths take comma-separated whole numbers")
    if not all(0 < n <= len(SHIFTS) * 4000 for n in sizes) or min(widths) < 1:
        p.error(f"sizes (and --width-n) must be in 1..{len(SHIFTS) * 4000}, widths at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    import torch
    from _markdown import finish, machine
    from bench_shard import compare
    import memloc
    from memloc.core.runtime import resolve_device
    from memloc.core.units import trace
    started, load_before = time.time(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = sorted({int(s) for s in str(args.sizes).split(",")})
    widths = sorted({int(w) for w in str(args.widths).split(",")})
    spec = MODELS[args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    points = [(n, 1) for n in sizes] + [(args.width_n, w) for w in widths if (args.width_n, w) not in
                                        {(n, 1) for n in sizes}]
    meas: dict = {}     # (N, width) -> {analysis: worker result}
    for n, w in points:
        path = runs_dir / f"{args.model}_n{n}_w{w}"
        shutil.rmtree(path, ignore_errors=True)
        cfg = {"dataset": f"bench_scale:mnist_shifted_{n}", "noise": 0.1, "model": spec, "width": w,
               "epochs": args.epochs}
        base = {"run": str(path), "cfg": cfg, "device": args.device, "threads": args.threads,
                "retrain_epochs": args.retrain_epochs, "flip_examples": args.flip_examples, "max_units": args.max_units}
        meas[n, w] = {}
        for a in ANALYSES:
            meas[n, w][a] = measure({**base, "analysis": a}, env, args.repeats)
            print(f"N={n} width={w} {a}: {meas[n, w][a]['seconds']:.2f} s, peak {meas[n, w][a]['peak_mib']:.0f} MiB",
                  flush=True)
    run0 = memloc.load(runs_dir / f"{args.model}_n{sizes[0]}_w1")
    args.layers = len(trace(run0.model(), run0.data().train.x[:2]).layers)

    def series(n, w):
        m = meas[n, w]
        flip_s = m["flip"]["seconds"]
        searches = m["flip"]["searches"]    # 0 when the model misclassifies every chosen example
        return {"load": m["flip"]["load_s"], **{a: m[a]["seconds"] for a in ANALYSES if a != "flip"},
                "flip per search": flip_s / searches if searches else float("nan"),
                "flip per step": flip_s / m["flip"]["steps"] if searches else float("nan")}

    names = ["load", "train", "gradients", "rewind", "retrain", "flip per search", "flip per step", "scores", "detect"]
    by_n = {n: series(n, 1) for n in sizes}
    by_w = {w: series(args.width_n, w) for w in widths}
    top = sizes[-3:]
    macs = {w: macs_per_example(spec, w) for w in widths}
    e_macs = slope(widths, [macs[w] for w in widths])
    big = meas[sizes[-1], 1]
    rows = []
    for a in names:
        t = [by_n[n][a] for n in sizes]
        e_all, e_top = slope(sizes, t), slope(top, [by_n[n][a] for n in top])
        expected = slope(sizes, [work(a, n, args) for n in sizes])
        e_w = slope(widths, [by_w[w][a] for w in widths])
        src = big["flip" if a.startswith("flip") or a == "load" else a]
        mem = (f"{src['gpu_peak_mib']:.0f} GPU" if device.type == "cuda" else
               f"{src['peak_mib']:.0f} (+{src['peak_mib'] - src['start_mib']:.0f})")
        unit = "ms" if a.startswith("flip") else "s"
        scale = 1e3 if a.startswith("flip") else 1
        text = note(a, e_all, e_top, expected)
        if a == "flip per search":
            text += " (searches: " + ", ".join(str(meas[n, 1]["flip"]["searches"]) for n in sizes) + ")"
        rows.append(f"| {a} | " + " | ".join(f"{x * scale:.3g}" for x in t) + f" | {unit} | {e_all:.2f} | {e_top:.2f} | "
                    f"{expected:.2f} | " + " | ".join(f"{by_w[w][a] * scale:.3g}" for w in widths) +
                    f" | {e_w:.2f} | {mem} | {text} |")
        print(rows[-1], flush=True)

    shard_rows = []
    if args.procs > 1:
        run = memloc.load(runs_dir / f"{args.model}_n{sizes[-1]}_w1")
        shard_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        options = {"flip": ["--examples", args.shard_flip_examples, "--max-units", str(args.max_units),
                            "--dtype", "float64"], "rewind": ["--checkpoints", "all"]}
        for name, opts in options.items():
            c = compare(run, name, opts, args.procs, args.shard_repeats, shard_env, startup=args.shard_startup)
            work1, workk = c["one"] - c["one_idle"], c["many"] - c["many_idle"]
            gain = f"{work1 / workk:.2f}x" if work1 > 0 and workk > 0 else "-"   # NaN without start-up timings
            idle = [f"{c[k]:.1f}" if np.isfinite(c[k]) else "-" for k in ("one_idle", "many_idle")]
            shard_rows.append(f"| {name} | `{' '.join(opts)}` | {c['one']:.1f} | {c['many']:.1f} | "
                              f"{c['one'] / c['many']:.2f}x | {idle[0]} | {idle[1]} | "
                              f"{gain} | {'yes' if c['same'] else 'NO'} |")
            print(shard_rows[-1], flush=True)

    cmd = " ".join(["python scripts/bench_scale.py", *(sys.argv[1:] if argv is None else argv)])
    k = f"N = {', '.join(map(str, sizes))}"
    lines = ["# How the analyses' cost grows with N and with the model width", "", f"`{cmd}`", "",
             f"Machine: {machine(device)} in every measuring process; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Load average {load_before:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end.{' ' + args.note if args.note else ''}", "",
             f"Model `{spec}` ({args.layers} layers; multiply-adds per example: "
             + ", ".join(f"width {w}: {macs[w] / 1e6:.2f} M" for w in widths) + f", exponent {e_macs:.2f} in width); "
             f"data: shifted MNIST-5k copies, 10% symmetric noise, 1,000 test images; {args.epochs} training "
             f"epochs, retrain {args.retrain_epochs} epochs, flip `{args.flip_examples}` (max {args.max_units} "
             f"units), gradients and rewind at every checkpoint, scores all. One fresh process per measurement "
             f"(the fastest of {args.repeats}).", "",
             "| analysis | " + " | ".join(f"N={n}" for n in sizes) + " | unit | exponent in N | "
             "exponent, largest 3 | expected from work | " + " | ".join(f"width {w}" for w in widths) +
             f" | exponent in width | peak MiB at N={sizes[-1]} (+ over start) | notes |",
             "|---|" + "---:|" * len(sizes) + "---|---:|---:|---:|" + "---:|" * len(widths) + "---:|---:|---|",
             *rows, "",
             f"* times: wall time of the analysis call in its own process ({k}; widths at N={args.width_n}), after "
             "Python, torch, the run's data and its final model are loaded (`load`: that loading, measured in the "
             "flip process); `train` builds its data itself. flip per search / per step: flip's time over the "
             "searches it ran (examples correctly classified, so searched) / over its example-steps, in ms.",
             "* exponent in N: least-squares slope of log time on log N over all sizes and over the largest three "
             "(fixed costs weigh less there); expected from work: the same slope of the forward-pass equivalents "
             "the analysis computes (forward 1, backward 2; `work()` in the script), which is below 1 where "
             "every pass also evaluates the fixed 1,000 test images. Acceptance: linear (0.9-1.1) in N unless "
             "the notes say why not; flip's cost per example is constant (exponent ~0).",
             f"* exponent in width: slope of log time on log width at N={args.width_n}; one forward pass grows "
             f"with exponent {e_macs:.2f} (multiply-adds above), so compute-bound analyses should approach that, "
             "fixed costs and small matrices keep it lower.",
             "* peak MiB: the measuring process's maximum resident set size (`resource.getrusage`; torch and the "
             "data included; + over start: the growth during the analysis call); on CUDA the peak allocated GPU "
             "memory. load and flip rows: the flip process."]
    if shard_rows:
        lines += ["", f"## 1 process against {args.procs} (torchrun, 1 thread each) at N={sizes[-1]}", "",
                  f"| analysis | options | 1 process s | {args.procs} processes s | speed-up | 1 process start-up s | "
                  f"{args.procs} processes start-up s | speed-up of the work | identical result |",
                  "|---|---|---|---|---|---|---|---|---|", *shard_rows, "",
                  "* `python -m memloc NAME RUN ...` against `torchrun --standalone --nproc-per-node K -m memloc NAME "
                  "RUN ...` (scripts/bench_shard.py's `compare`), best of "
                  f"{args.shard_repeats} alternating timings, whole commands; start-up: the same command once the "
                  "result exists; speed-up of the work = (1 process - its start-up) / (K processes - theirs)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    finish(lines, started, args.out)


if __name__ == "__main__":
    main()
