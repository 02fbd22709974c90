"""Throughput of analyses split across processes: 1 process against torchrun with K, side by side.

    python scripts/bench_shard.py [--run RUN] [--analyses flip] [--procs 2] [--out artifacts/bench_shard.md]
    python scripts/bench_shard.py --lm [--analyses gradients]      # a language-model run: a section appended

For each analysis it runs the same command (``memloc <analysis> RUN ...``) once in one process
and once under ``torchrun --standalone --nproc-per-node K``, every process with 1 torch thread,
alternating ``--repeats`` times, and reports the best wall times, the speed-up and whether the
two results are identical (float64 searches). The run is the MNIST-5k lenet (40 epochs; trained
into a temporary directory unless ``--run`` is given). Wall times include starting Python and torch in
every process (a few seconds), as a user sees them. ``--lm``: the same on a language-model run
(:data:`LM_RUN`, trained into a temporary directory unless ``--run`` is given), its table appended to
``--out`` as a section of its own; the load average is recorded beside the times.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memloc  # noqa: E402
from memloc.training.train import train  # noqa: E402

ANALYSES = {
    "flip": ["--examples", "any:1500", "--repeats", "2", "--dtype", "float64", "--max-units", "60"],
    "rewind": [],
    "retrain": ["--epochs", "10"],
    "scores": ["--scores", "grand,tracin"],
    "gradients": [],
}
#: the language-model run of --lm: TinyMem multiplication, 2 blocks (about a minute to train on one core)
LM_RUN = {"dataset": "tinymem:mult", "model": "gpt", "n_layer": 2, "d_model": 64, "n_head": 4, "n_train": 512,
          "n_test": 64, "seq_len": 32, "noise": 0.1, "epochs": 8, "batch_size": 32}
LM_ANALYSES = {"scores": ["--scores", "grand,tracin"], "gradients": [], "rewind": [], "retrain": ["--epochs", "2"],
               "localise-neurons": ["--examples", ",".join(map(str, range(48))), "--eval-batch-size", "4",
                                    "--methods", "grad_x_act,greedy,slimming,hard_concrete,random",
                                    "--set", "slimming.max_steps=200", "--set", "hard_concrete.max_steps=200"]}
COMPARED = {"flip": ("n_units", "flipped", "unit_ids", "unit_offsets"), "rewind": ("accuracy",),
            "retrain": ("accuracy",), "scores": ("grand", "tracin"), "gradients": ("norm", "cosine"),
            "localise-neurons": ("score", "greedy_zeroed")}


def timed(cmd, env, check=True) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def compare(run, name, options, procs, repeats, env, *, compared=COMPARED, startup=True) -> dict:
    """``memloc NAME RUN OPTIONS`` in 1 process and under torchrun with ``procs``, alternating ``repeats``
    times: the best wall times ``one`` / ``many``, with ``startup`` also those of the same command
    once its result exists (``one_idle`` / ``many_idle``: start-up only), and whether the results'
    ``compared[name]`` arrays are identical (``same``). The result file is removed afterwards."""
    out = run.results_path(name.replace("-", "_"))      # localise-neurons writes localise_neurons.h5
    base = ["-m", "memloc", name, str(run.path), *options, "--device", "cpu", "--overwrite"]
    one = [sys.executable, *base]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *base]
    times = {"one": [], "many": [], "one_idle": [], "many_idle": []}
    results = {}
    for _ in range(repeats):
        for key, cmd in (("one", one), ("many", many)):
            out.unlink(missing_ok=True)
            times[key].append(timed(cmd, env))
            if startup:  # the same command again stops at the existing result ("already complete", or
                # "exists" with exit status 2): start-up, loading and checks only
                times[f"{key}_idle"].append(timed([c for c in cmd if c != "--overwrite"], env, check=False))
            res = memloc.load(run.path).result(out.stem)
            results[key] = {k: res[k].values for k in compared[name]}
    out.unlink(missing_ok=True)
    same = all(np.array_equal(results["one"][k], results["many"][k], equal_nan=True) for k in compared[name])
    return {**{k: min(v) if v else float("nan") for k, v in times.items()}, "same": same}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", help="run directory (default: train the MNIST-5k MLP into a temporary directory)")
    p.add_argument("--analyses", default="flip", help=f"comma-separated, of {', '.join(ANALYSES)}")
    p.add_argument("--procs", type=int, default=2, help="processes under torchrun")
    p.add_argument("--repeats", type=int, default=2, help="alternating timings of each (the best is kept)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench_shard.md"))
    p.add_argument("--lm", action="store_true", help="a language-model run (LM_RUN); the table appended to --out")
    args = p.parse_args(argv)
    options = LM_ANALYSES if args.lm else ANALYSES
    load_before = os.getloadavg()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = memloc.load(args.run) if args.run else train(Path(tmp) / "run", LM_RUN if args.lm else
                                                            {"model": "lenet", "epochs": 40}, device="cpu")
        for name in args.analyses.split(","):
            c = compare(run, name, options[name], args.procs, args.repeats, env)
            t1, tk, i1, ik = c["one"], c["many"], c["one_idle"], c["many_idle"]
            rows.append(f"| {name} | `{' '.join(options[name])}` | {t1:.1f} | {tk:.1f} | {t1 / tk:.2f}x | {i1:.1f} | "
                        f"{ik:.1f} | {(t1 - i1) / max(tk - ik, 1e-9):.2f}x | {'yes' if c['same'] else 'NO'} |")
            print(rows[-1], flush=True)
        about = f"run {run.config.get('model')} on {run.config.get('dataset')} ({run.final_epoch} epochs)"
        if args.lm:
            about += (f", {len(run.data())} sequences of {run.config['seq_len']} tokens, {run.config['n_layer']} "
                      f"blocks of width {run.config['d_model']}")
    load = f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    lines = ["# Analyses split across processes (torchrun, gloo on CPU)", "",
             f"`python scripts/bench_shard.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
             f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}; "
             f"{about}; every process 1 torch thread; best of {args.repeats} "
             f"alternating timings, wall time of the whole command (Python and torch start-up included); {load}.", "",
             f"| analysis | options | 1 process s | {args.procs} processes s | speed-up | 1 process start-up s | "
             f"{args.procs} processes start-up s | speed-up of the work | identical result |",
             "|---|---|---|---|---|---|---|---|---|", *rows, "",
             "* start-up: the same command run again once its result exists (it stops at 'already complete' or "
             "'exists'): "
             "starting Python, torch and torchrun's processes, loading the run. Speed-up of the work = (1 process "
             "- its start-up) / (K processes - their start-up)."]
    if args.lm:         # a section of its own after the image runs' table
        lines[0] = "## A language-model run"
        old = Path(args.out).read_text() if Path(args.out).exists() else ""
        lines = [old.split("\n## A language-model run")[0].rstrip("\n"), "", *lines] if old else lines
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
