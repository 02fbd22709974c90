"""The prepared GPU check: everything memloc wants measured on a GPU, in one run of at most ~8 minutes.

    python scripts/gpu_check.py [--data-root DIR] [--out-dir artifacts] [--budget 480] [--device cuda]
    python scripts/gpu_check.py --dry-run        # the same steps on the CPU at toy size (~1 min; tests/test_gpu_check.py)

GPU time for this project comes in short windows, so the check is ready before one opens: copy the
tree to the GPU machine, run the first line, and bring back ``artifacts/gpu_*.md``. Steps, in order
(each timed and written even when another fails; a failed step is reported, not fatal):

1. ``environment``: GPU name, memory, driver, CUDA / cuDNN / torch versions.
2. ``cuda_tests``: ``pytest -m cuda`` (the tests that skip without a GPU: masks, augmentation,
   pinned streaming, bf16 / fp16 training and analyses; the two-GPU test skips on one GPU).
3. ``throughput_fp32`` and ``throughput_bf16``: ``scripts/bench_throughput.py`` on the MNIST-5k MLP
   and lenet (bf16: autocast, lenet in channels_last), every analysis as a fraction of a raw forward /
   forward+backward of the same model; the tables go to ``gpu_throughput_fp32.md`` / ``_bf16.md``.
4. ``ddp``: one-process NCCL ``torchrun ... memloc train`` beside the same training without torchrun;
   the final weights must agree (the group, DistributedDataParallel and the checkpoint path on a GPU).
5. ``flip_resnet9``: the paper's flip protocol (``protocol="paper"``: weight site, 5 noise samples,
   reference batch 512) on a ResNet-9 of width 64 trained briefly on CIFAR-10 (``--data-root`` holding
   ``cifar-10-batches-py``) or, without it, on generated images of CIFAR's shape (3 x 32 x 32, 10
   classes, class templates plus noise); searches/s and the time the paper's 1,000 examples x 30
   repeats would take at that rate.

Writes ``gpu_check.md`` (the summary: machine, each step's status, seconds and findings) beside the
step tables in ``--out-dir``. ``--dry-run`` runs every step on the CPU at toy size (gloo instead of
NCCL, a width-4 ResNet-9 on 256 generated images, one throughput round of the MLP) into a temporary
folder unless ``--out-dir`` is given, so that the script is exercised by CI and cannot rot.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import memloc  # noqa: E402
from _markdown import finish, invocation, machine  # noqa: E402
from memloc.core.data import make_data  # noqa: E402
from memloc.core.runtime import resolve_device  # noqa: E402

#: the settings of each step: (GPU run, dry run)
SETTINGS = {
    "throughput": ({"models": "mlp,lenet", "repeats": 2, "extra": []},
                   {"models": "mlp", "repeats": 1, "run": {"dataset": "digits", "model": "mlp", "epochs": 2},
                    "extra": ["--analyses", "train,flip", "--train-epochs", "1", "--raw-seconds", "0.05",
                              "--flip-examples", "noisy:2,clean:2", "--max-units", "5"]}),
    "ddp": ({"dataset": "mnist5k", "model": "lenet", "epochs": 3},
            {"dataset": "digits", "model": "mlp", "epochs": 1}),
    "flip": ({"width": 64, "train_size": 10000, "epochs": 8, "batch_size": 512, "examples": "noisy:32,clean:32",
              "max_units": 100, "generated": "cifar_shaped"},
             {"width": 4, "train_size": None, "epochs": 2, "batch_size": 32, "examples": "clean:2",
              "max_units": 5, "generated": "cifar_shaped_toy"}),
}
#: the paper's flip workload (Maini et al. 2023: 1,000 examples, 30 repeats of the noisy search)
PAPER_SEARCHES = 1000 * 30


def cifar_shaped(n_train: int = 10000, n_test: int = 1000, scale: float = 1.0, seed: int = 0):
    """Generated images of CIFAR-10's shape: 10 classes, each a smooth random template (3 x 32 x 32)
    plus per-image Gaussian noise (``scale`` times the templates' scale), so that a network learns them
    but not at once."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.interpolate(torch.randn(10, 3, 8, 8, generator=g), size=32, mode="bilinear")
    y = torch.arange(n_train + n_test) % 10
    x = templates[y] + scale * torch.randn(len(y), 3, 32, 32, generator=g)
    return make_data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=10, name="cifar_shaped")


def cifar_shaped_toy():
    """The dry run's :func:`cifar_shaped`: 256 training and 64 test images, learnt in an epoch or two."""
    return cifar_shaped(256, 64, scale=0.3)


# ----------------------------------------------------------------------------- the steps
def environment(args, device, out: Path) -> list[str]:
    lines = [f"Machine: {machine(device)}; Python {platform.python_version()}, memloc {memloc.__version__}."]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        driver = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown"
        lines.append(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                     f"driver {driver.splitlines()[0] if driver else 'unknown'}, CUDA {torch.version.cuda}, "
                     f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPU(s) visible.")
    else:
        lines.append("No GPU: the dry run on the CPU (toy sizes; the numbers only show that every step runs).")
    return lines


def cuda_tests(args, device, out: Path) -> list[str]:
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                    if "needs_cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *marked]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout)
    tail = [line for line in p.stdout.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    if p.returncode not in (0, 5):
        raise StepFailed(f"pytest -m cuda exited {p.returncode}: {tail[0]}", p.stdout[-3000:] + p.stderr[-2000:])
    return [f"`{' '.join(['pytest', *cmd[3:]])}`: {tail[0]}"]


def throughput(precision: str):
    def step(args, device, out: Path) -> list[str]:
        import bench_throughput
        s = SETTINGS["throughput"][args.dry_run]
        target = out / f"gpu_throughput_{precision}.md"
        with tempfile.TemporaryDirectory(prefix="gpu_check_bench_") as tmp:
            given = []      # the dry run's toy run (else the benchmark trains its own MNIST-5k runs)
            if "run" in s:
                memloc.train(Path(tmp) / "mlp", s["run"], device=device)
                given = ["--run", f"mlp={Path(tmp) / 'mlp'}"]
            bench_throughput.main(["--device", device.type, "--precision", precision, "--models", s["models"],
                                   "--repeats", str(s["repeats"]), "--out", str(target), *given, *s["extra"],
                                   "--note", "Run by scripts/gpu_check.py" + (" --dry-run." if args.dry_run else ".")])
        rows = [line for line in target.read_text().splitlines() if line.startswith("| ") and "|---" not in line]
        return [f"{len(rows) - 1} rows in [{target.name}]({target.name}); the fractions of raw:",
                *(f"    {r}" for r in rows if r.split("|")[2].strip() in ("analysis", "train", "flip", "rewind",
                                                                         "retrain", "scores all"))]
    return step


def ddp(args, device, out: Path) -> list[str]:
    cfg = SETTINGS["ddp"][args.dry_run]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()] + ["--device", device.type]
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        one, group = Path(tmp) / "plain", Path(tmp) / "torchrun"
        memloc.train(one, {**cfg}, device=device)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "memloc", "train", str(group), *flags]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - t0
        if p.returncode:
            raise StepFailed(f"torchrun exited {p.returncode}", p.stderr[-3000:])
        a, b = memloc.load(one).model().state_dict(), memloc.load(group).model().state_dict()
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if diff > 1e-3:
        raise StepFailed(f"one-process {backend} training differs from plain training by {diff:.3g}")
    return [f"`torchrun --nproc-per-node 1 -m memloc train` ({backend}; {', '.join(f'{k} {v}' for k, v in cfg.items())}) "
            f"in {seconds:.1f} s (start-up included); largest weight difference from the same training "
            f"without torchrun: {diff:.3g}" + (" (bit-identical)" if diff == 0 else "")]


def flip_resnet9(args, device, out: Path) -> list[str]:
    s = SETTINGS["flip"][args.dry_run]
    real = args.data_root and (Path(args.data_root) / "cifar-10-batches-py").is_dir()
    if real:
        data = {"dataset": "cifar10", "data_root": args.data_root, "train_size": s["train_size"]}
        what = f"CIFAR-10 from {args.data_root} ({s['train_size']} training images)"
    else:
        data = {"dataset": f"gpu_check:{s['generated']}"}      # an import path: a dataset factory of this script
        what = f"generated CIFAR-shaped images (gpu_check.{s['generated']}: 3 x 32 x 32, 10 classes)"
    cfg = {**data, "model": "resnet9", "width": s["width"], "epochs": s["epochs"], "batch_size": s["batch_size"],
           "noise": 0.1, "lr": 0.1}
    with tempfile.TemporaryDirectory(prefix="gpu_check_flip_") as tmp:
        t0 = time.perf_counter()
        run = memloc.train(Path(tmp) / "resnet9", cfg, device=device)
        train_s = time.perf_counter() - t0
        _sync(device)
        t0 = time.perf_counter()
        res = memloc.flip(run, examples=s["examples"], max_units=s["max_units"], protocol="paper",
                          device=device, resume=None)
        _sync(device)
        flip_s = time.perf_counter() - t0
        acc, params = run.metrics(), sum(p.numel() for p in run.model().parameters())
    status, units = np.asarray(res["status"]), np.asarray(res["n_units"])
    searched = int((status == 0).sum())
    rate = searched / flip_s
    lines = [f"ResNet-9 width {s['width']} ({params:,} parameters) on {what}, "
             f"10% noise, {s['epochs']} epochs in {train_s:.1f} s (train accuracy {acc['train_accuracy'][-1]:.1%}, "
             f"test {acc['test_accuracy'][-1]:.1%}).",
             f"`memloc.flip(run, examples={s['examples']!r}, max_units={s['max_units']}, protocol='paper')`: "
             f"{searched} searches of {len(status)} examples (the others misclassified or not flipped) in "
             f"{flip_s:.1f} s, {np.mean(units[status == 0]) if searched else float('nan'):.1f} weight items "
             f"zeroed per search on average: **{rate:.3g} searches/s**."]
    if searched:
        hours = PAPER_SEARCHES / rate / 3600
        lines.append(f"The paper's 1,000 examples x 30 repeats ({PAPER_SEARCHES:,} searches) at that rate: "
                     f"**{hours:.3g} h** on this device (searches that need more items take longer).")
    return lines


STEPS = {"environment": environment, "cuda_tests": cuda_tests, "throughput_fp32": throughput("fp32"),
         "throughput_bf16": throughput("bf16"), "ddp": ddp, "flip_resnet9": flip_resnet9}


class StepFailed(Exception):
    """A step that ran but did not pass; ``detail`` goes to the summary."""
    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _command(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv=None) -> int:
    started = time.time()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at toy size (what CI runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda, which a GPU check needs (cpu with --dry-run)")
    p.add_argument("--data-root", default=None, help="a folder holding cifar-10-batches-py (else generated images)")
    p.add_argument("--out-dir", default=None, help="where gpu_*.md go (default: artifacts/, a temporary folder "
                                                    "with --dry-run)")
    p.add_argument("--steps", default="all", help=f"comma-separated subset of: {', '.join(STEPS)}")
    p.add_argument("--step-timeout", type=int, default=300, help="seconds before a subprocess step is stopped")
    args = p.parse_args(argv)
    steps = list(STEPS) if args.steps == "all" else [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"--steps: unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEPS)}")
    if args.data_root and not Path(args.data_root).is_dir():
        p.error(f"--data-root {args.data_root!r} is not a folder")
    try:
        device = resolve_device("cpu" if args.dry_run and args.device == "auto" else args.device)
    except memloc.MemlocError as e:
        p.error(str(e))
    if device.type != "cuda" and not args.dry_run:
        p.error("no CUDA device: the GPU check needs one (--dry-run runs its steps on the CPU at toy size)")
    out = Path(args.out_dir) if args.out_dir else (None if args.dry_run else ROOT / "artifacts")
    tmp = None
    if out is None:
        tmp = out = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    cmd = invocation(__file__, argv)
    lines = ["# GPU check" + (" (dry run on the CPU, toy sizes)" if args.dry_run else ""), "", f"`{cmd}`", ""]
    failed = []
    for name in steps:
        print(f"gpu_check: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            found, status = STEPS[name](args, device, out), "ok"
        except StepFailed as e:
            found, status = [str(e), *(["", "```", e.detail.strip(), "```"] if e.detail else [])], "FAILED"
        except Exception as e:      # a broken step is reported, and the others still run
            found, status = [f"{type(e).__name__}: {e}", "", "```", traceback.format_exc()[-3000:], "```"], "FAILED"
        seconds = time.perf_counter() - t0
        if status != "ok":
            failed.append(name)
        lines += [f"## {name}: {status} ({seconds:.0f} s)", "", *found, ""]
        print(f"gpu_check: {name}: {status} in {seconds:.1f} s", flush=True)
    lines.append(f"Steps failed: {', '.join(failed)}." if failed else "Every step passed.")
    finish(lines, started, str(out / "gpu_check.md"))
    if tmp is not None and not failed:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        print(f"gpu_check: the tables are in {tmp}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
