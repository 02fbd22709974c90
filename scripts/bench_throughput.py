"""How close each analysis gets to the hardware: its examples/s beside a raw pass of the same model.

    python scripts/bench_throughput.py [--run RUN ...] [--models mlp,lenet] [--device auto|cpu|cuda]
                                       [--threads T] [--precision fp32|bf16|fp16] [--out artifacts/bench_throughput.md]

For each model (the MNIST-5k ``mlp`` and ``lenet`` runs of ``--run``, else trained into a temporary
directory with the settings of :data:`bench_prefix.RUNS`), in one process and on one device, it
measures ``--repeats`` interleaved rounds (the fastest of each is kept, against noise) of

* ``raw fwd``: one evaluation pass of the final model over the training set (eval mode, no grad,
  batches of 256 or 1024, the faster): the hardware limit of evaluation work;
* ``raw fwd+bwd``: one training pass (train mode, cross-entropy, parameter gradients, no optimiser
  step, batches of the run's training batch size): the limit of gradient work;
* every analysis through the library (``memloc.train`` of ``--train-epochs`` epochs, ``gradients``,
  ``rewind``, ``retrain``, ``flip``, ``scores`` one score at a time and all together, ``detect``),

counts the example passes each analysis does (forward and forward+backward, from its result and
configuration; :func:`work_of`), and reports its examples/s and the fraction of the raw rate:
the time the raw passes would take for the same work over the time the analysis took (for
evaluation-only work the analysis's forward examples/s over raw fwd; for gradient work over raw
fwd+bwd; a weighted mix where an analysis does both). Work an analysis avoids (cached prefixes,
memoised reference terms) still counts as done, so fractions above 100% mean the analysis does
less than the plain passes it replaces. ``--precision`` other than fp32 is passed to the analyses
that take it (``precision=``) and the raw passes run under ``torch.autocast`` with that dtype.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import memloc  # noqa: E402
from _markdown import finish, invocation, machine  # noqa: E402
from bench_prefix import RUNS  # noqa: E402
from memloc.core.runtime import resolve_device  # noqa: E402
from memloc.analyses.scores import select_scores  # noqa: E402
from memloc.training.train import DEFAULTS  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
#: rows timed in the first round only (every score at once repeats the per-score rows; detect reads it)
ONCE = ("scores all",)
#: analyses that get ``precision=`` when it is not fp32 (train: the ``precision`` key of its config)
TAKES_PRECISION = ("rewind", "retrain", "flip", "scores")
#: model passes of one score per training example: (forward, forward+backward); tracin's count is
#: multiplied by its checkpoints. Scores not listed read recorded results only (the training
#: dynamics of run.h5, final_loss its end-of-training losses; neuron_count the flip result).
SCORE_PASSES = {"el2n": (1, 0), "grand": (0, 1), "tracin": (0, 1)}


FWD_BATCHES = (256, 1024)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Work:
    """What one analysis call computed, in example passes of the whole model."""
    fwd: float = 0.0            # example forward passes (eval mode, no grad)
    fb: float = 0.0             # example forward+backward passes
    count: float = 0.0          # the analysis's own unit (example-epochs, searches, ...), for its rate
    unit: str = "examples"
    what: str = ""              # how the passes were counted

    def basis(self) -> str:
        return {(True, False): "fwd", (False, True): "fwd+bwd", (True, True): "fwd + fwd+bwd"}.get(
            (self.fwd > 0, self.fb > 0), "none")


def raw_passes(model, x, y, *, batch_size: int, train: bool, autocast):
    """One pass of ``model`` over the examples ``x``, labels ``y``: eval + no grad, or train mode + backward."""
    model.train(train)
    with autocast(), (contextlib.nullcontext() if train else torch.no_grad()):
        for s in range(0, len(y), batch_size):
            out = model(x[s:s + batch_size])
            if train:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(out.float(), y[s:s + batch_size]).backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def raw_rate(fn, n: int, device, min_s: float) -> float:
    """Examples/s of ``fn`` (one pass over ``n`` examples), repeated for at least ``min_s`` seconds."""
    fn()    # warm-up
    sync(device)
    passes, t0 = 0, time.perf_counter()
    while passes < 2 or time.perf_counter() - t0 < min_s:
        fn()
        passes += 1
    sync(device)
    return passes * n / (time.perf_counter() - t0)


def checkpoint_list(run, count: int = 4) -> str:
    """About ``count`` checkpoints spread evenly from 0 to the final epoch, as a selection string."""
    final = run.final_epoch
    return ",".join(map(str, sorted({round(i * final / (count - 1)) for i in range(count)})))


def work_of(name: str, res, run, args) -> Work:
    """The example passes ``res`` (the result of analysis ``name`` on ``run``) stands for."""
    n, n_test = run.num_train, len(run.data().test)     # run.data() is built once per Run and kept
    n_clean = int((~np.asarray(run.is_noisy, bool)).sum())
    if name == "train":
        e = args.train_epochs
        return Work(fwd=(e + 1) * (n + n_test), fb=e * n, count=e * n, unit="example-epochs",
                    what=f"{e} epochs x N fwd+bwd + {e + 1} evaluations of train + test")
    if name == "gradients":
        c = len(res["checkpoint"])
        # one forward and two backward passes = two forward+backward passes less one forward
        return Work(fwd=-c * n, fb=2 * c * n, count=c * n, unit="example-checkpoints",
                    what=f"{c} checkpoints x N x (fwd + 2 bwd)")
    if name == "rewind":
        cells = res["accuracy"].shape[0] * res["accuracy"].shape[1]
        return Work(fwd=(cells + 1) * (n + n_test), count=(cells + 1) * (n + n_test), unit="example-passes",
                    what=f"({cells} cells + baseline) x (N + test) fwd")
    if name == "retrain":
        layers, epochs = len(res["layer"]), len(res["epoch"]) - 1
        fwd, fb = (layers * (epochs + 1) + 1) * (n + n_test), layers * epochs * n_clean
        return Work(fwd=fwd, fb=fb, count=fwd + fb, unit="example-passes",
                    what=f"{layers} layers x ({epochs} epochs x clean fwd+bwd + {epochs + 1} evaluations)")
    if name == "flip":
        searched = np.asarray(res["status"]) == 0
        n_units = np.asarray(res["n_units"])[searched]
        searches, steps = n_units.size, int((n_units + 1).sum())
        cfg = res.config
        rows = max(cfg.get("noise_samples") or 0, 1) + cfg["ref_batch_size"]
        return Work(fb=steps * rows, count=searches, unit="searches",
                    what=f"{steps} example-steps x ({rows} rows fwd+bwd)")
    if name == "detect":
        return Work(count=n, unit="examples", what="reads the scores")
    if name.startswith("scores"):
        chosen = res.config["scores"]
        fwd = sum(SCORE_PASSES.get(s, (0, 0))[0] for s in chosen) * n
        fb = sum(SCORE_PASSES.get(s, (0, 0))[1] * (len(res.config.get("tracin_epochs", [])) if s == "tracin" else 1)
                 for s in chosen) * n
        what = " + ".join(f"{int(k // n)} x N {unit}" for k, unit in ((fwd, "fwd"), (fb, "fwd+bwd")) if k)
        what = what or ("reads the flip result" if chosen == ["neuron_count"] else "reads the recorded dynamics")
        return Work(fwd=fwd, fb=fb, count=n, unit="examples", what=what)
    raise ValueError(name)


def precision_kw(fn, name: str, precision: str) -> dict:
    if precision == "fp32" or name not in TAKES_PRECISION:
        return {}
    if "precision" not in inspect.signature(fn).parameters:
        raise SystemExit(f"bench_throughput.py: error: --precision {precision}: memloc.{name} has no precision= "
                         "keyword in this memloc")
    return {"precision": precision}


def analyses(run, args, device, tmp: Path, state: dict) -> dict:
    """``{row name: (settings, call)}``: each call runs one analysis and returns its result."""
    cfg = {k: v for k, v in run.config.items() if k in DEFAULTS}
    if "precision" in DEFAULTS:
        cfg["precision"] = args.precision
    elif args.precision != "fp32":
        raise SystemExit(f"bench_throughput.py: error: --precision {args.precision}: memloc.train has no precision "
                         "option in this memloc")
    ckpts = args.checkpoints or checkpoint_list(run)
    kw = {k: precision_kw(getattr(memloc, k), k, args.precision) for k in
          ("gradients", "rewind", "retrain", "flip", "scores")}

    def train():
        path = tmp / f"train{state.setdefault('trainings', 0)}"
        state["trainings"] += 1
        try:
            return memloc.train(path, {**cfg, "epochs": args.train_epochs}, device=device)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    names = select_scores(args.scores, run)

    def all_scores():
        state["scores"] = memloc.scores(run, methods=names, device=device, **kw["scores"])
        return state["scores"]

    calls = {
        "train": (f"{args.train_epochs} epochs of the run's config", train),
        "gradients": (f"checkpoints {ckpts}", lambda: memloc.gradients(run, checkpoints=ckpts, device=device)),
        "rewind": (f"checkpoints {ckpts}", lambda: memloc.rewind(run, checkpoints=ckpts, device=device, **kw["rewind"])),
        "retrain": (f"{args.retrain_epochs} epochs", lambda: memloc.retrain(run, epochs=args.retrain_epochs,
                                                                             device=device, **kw["retrain"])),
        "flip": (f"{args.flip_examples}, max {args.max_units} units",
                 lambda: memloc.flip(run, examples=args.flip_examples, max_units=args.max_units, device=device,
                                     resume=None, **kw["flip"])),
    }
    for s in names:
        calls[f"scores {s}"] = (s, lambda s=s: memloc.scores(run, methods=[s], device=device, **kw["scores"]))
    calls["scores all"] = ("every score" if args.scores == "all" else args.scores, all_scores)
    calls["detect"] = ("those scores", lambda: memloc.detect(state["scores"], is_noisy=run.is_noisy))
    wanted = [a.strip() for a in args.analyses.split(",")]
    if "detect" in wanted:
        wanted.append("scores all")     # detect ranks by its result
    return {k: v for k, v in calls.items() if "all" in wanted or k.split()[0] in wanted or k in wanted}


def bench_model(name, run, args, device, tmp) -> list[dict]:
    data, model = run.data(device), run.model(device=device)
    x, y, autocast = data.train.x, data.train.y, contextlib.nullcontext
    if args.precision != "fp32":    # the raw passes as the analyses run them: autocast (and channels_last)
        from memloc.core.precision import apply_channels_last, to_channels_last
        from memloc.core.precision import autocast as precision_autocast
        if apply_channels_last(model, args.precision, device):
            x = to_channels_last(x)
        autocast = lambda: precision_autocast(args.precision, device)  # noqa: E731
    n, bs = run.num_train, int(run.config.get("batch_size", DEFAULTS["batch_size"]))
    # raw fwd: the faster of batches of 256 and 1024 (large conv batches can be slower on a CPU's caches)
    raws = {"fwd": [lambda b=b: raw_passes(model, x, y, batch_size=b, train=False, autocast=autocast)
                    for b in FWD_BATCHES],
            "fwd+bwd": [lambda: raw_passes(model, x, y, batch_size=bs, train=True, autocast=autocast)]}
    state: dict = {}
    calls = analyses(run, args, device, tmp, state)
    best = {k: float("inf") for k in [*raws, *calls]}
    results = {}
    for r in range(args.repeats):       # interleaved rounds: raw passes and analyses share the noise
        for key, fns in raws.items():
            for fn in fns:
                best[key] = min(best[key], n / raw_rate(fn, n, device, args.raw_seconds))
        for key, (_, call) in calls.items():
            if key in ONCE and r:
                continue
            sync(device)
            t0 = time.perf_counter()
            results[key] = call()
            sync(device)
            best[key] = min(best[key], time.perf_counter() - t0)
        print(f"{name}: round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.3g} s" for k, v in best.items()),
              flush=True)
    rate = {k: n / best[k] for k in raws}
    rows = [{"model": name, "analysis": f"raw {k}", "settings": f"batch {' or '.join(map(str, FWD_BATCHES)) if k == 'fwd' else bs}",
             "what": f"N = {n} examples", "seconds": best[k], "rate": rate[k], "unit": "examples",
             "passes_per_s": rate[k], "basis": k, "raw": rate[k], "fraction": 1.0} for k in raws]
    for key, (settings, _) in calls.items():
        w, t = work_of(key, results[key], run, args), best[key]
        ideal = w.fwd / rate["fwd"] + w.fb / rate["fwd+bwd"]
        passes = w.fwd + w.fb
        rows.append({"model": name, "analysis": key, "settings": settings, "what": w.what, "seconds": t,
                     "rate": w.count / t, "unit": w.unit, "passes_per_s": passes / t if passes else float("nan"),
                     "basis": w.basis(), "raw": passes / ideal if ideal else float("nan"),
                     "fraction": ideal / t if ideal else float("nan")})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def parse_runs(values) -> dict:
    """``--run [MODEL=]PATH`` values -> {model: run}; the model is read from the run when not named."""
    runs = {}
    for value in values or []:
        key, _, path = value.rpartition("=")
        run = memloc.load(path)
        runs[key or run.config.get("model")] = run
    return runs


def fmt(x: float) -> str:
    if not np.isfinite(x):
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main(argv=None):
    started, load_before = time.time(), os.getloadavg()[0]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", action="append", metavar="[MODEL=]PATH",
                   help="a trained run to use for MODEL (repeatable; default: train the models into a temporary "
                        "directory with the settings of scripts/bench_prefix.py)")
    p.add_argument("--models", default="mlp,lenet", help="comma-separated models (mlp, lenet)")
    p.add_argument("--analyses", default="all",
                   help="comma-separated: train, gradients, rewind, retrain, flip, scores, detect, or all")
    p.add_argument("--scores", default="all", help="scores timed one by one and together (memloc.scores names)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="passed to the analyses as precision= (when not fp32); the raw passes use autocast")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (the fastest of each is kept)")
    p.add_argument("--raw-seconds", type=float, default=0.5, help="minimum seconds of each raw measurement")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of the timed trainings")
    p.add_argument("--checkpoints", default=None, help="checkpoints of gradients and rewind (default: 4 spread "
                                                       "evenly over training)")
    p.add_argument("--retrain-epochs", type=int, default=3)
    p.add_argument("--flip-examples", default="noisy:50,clean:50")
    p.add_argument("--max-units", type=int, default=100)
    p.add_argument("--note", default="", help="a sentence added to the header (e.g. the state of the machine)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench_throughput.md"), help="Markdown file to write")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        given = parse_runs(args.run)
    except memloc.MemlocError as e:     # a user mistake: one line, exit status 2
        p.error(str(e))
    rows = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in given and m not in RUNS]
    if unknown:
        p.error(f"--models: no run given for {', '.join(unknown)} and no default settings (known: {', '.join(RUNS)})")
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        for name in models:
            run = given.get(name) or memloc.train(Path(tmp) / name, RUNS[name], device=device)
            rows += bench_model(name, run, args, device, Path(tmp))
    cmd = invocation(__file__, argv)
    lines = ["# Throughput of the analyses against a raw pass of the same model", "",
             f"`{cmd}`", "",
             f"Machine: {machine(device)}; precision {args.precision}; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Load average {load_before:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end. Best of {args.repeats} interleaved rounds.{' ' + args.note if args.note else ''}",
             "", "| model | analysis | settings | work counted | best s | rate | example passes/s | raw basis | "
             "raw examples/s | fraction of raw |", "|---|---|---|---|---:|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['analysis']} | {r['settings']} | {r['what']} | {r['seconds']:.3g} | "
                     f"{fmt(r['rate'])} {r['unit']}/s | {fmt(r['passes_per_s'])} | {r['basis']} | {fmt(r['raw'])} | "
                     f"{'-' if not np.isfinite(r['fraction']) else format(r['fraction'], '.0%')} |")
    lines += ["", "* raw fwd: an evaluation pass over the training set (eval mode, no grad, batches of 256 or 1024, the faster); raw fwd+bwd: "
              "a training pass (train mode, cross-entropy, parameter gradients, no optimiser step, the run's batch "
              "size); both of the final model on the same device, measured in every round.",
              "* work counted: the example passes of the whole model that the analysis stands for (N training "
              "examples, test = the test set, clean = the clean training examples); example passes/s = those "
              "passes over the best time.",
              "* raw examples/s: the raw rate of the same mix of passes (fwd for evaluation work, fwd+bwd for "
              "gradient work, their time-weighted mix for both); fraction of raw = example passes/s over it = "
              "time the raw passes would take / time the analysis took. 100% = the analysis runs at the speed "
              "of plain passes; above 100% it skips work that the count includes (rewind and retrain compute "
              "the frozen prefix once; flip memoises reference terms and caches its first layers).",
              "* scores all: every score in one call, timed in the first round only (its tracin alone is "
              "one fwd+bwd pass per checkpoint); detect ranks by its result.",
              "* rate: the analysis's own unit: example-epochs/s for training (its evaluations included in the "
              "time), searches/s for flip, examples/s for scores and detect. Times include reading the "
              "checkpoints from disk, as a user of the library sees them (the data are built once per run: "
              "a `memloc.Run` keeps them).",
              "* gradients: one forward and two backward passes per example and checkpoint, counted as two "
              "fwd+bwd less one fwd. flip: each example-step is a fwd+bwd of the example's copies and its "
              "reference batch. Scores read from the recorded dynamics (final_loss, confidence, variability, "
              "forgetting, aum), neuron_count (the saved flip result) and detect do no model passes: '-'."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    finish(lines, started, args.out)


if __name__ == "__main__":
    main()
