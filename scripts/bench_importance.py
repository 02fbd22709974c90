"""Importance maps (Fisher / MAS) of a model made of Linear layers: outer products vs torch.func.

    python scripts/bench_importance.py [--examples 1024] [--repeats 3] [--device auto] [--out artifacts/bench_importance.md]

The MNIST-5k MLP of memloc's trainer (untrained weights: the cost does not depend on them), the same
examples, side by side in each repeat (best of the repeats): memloc's path for models whose
parameters all sit in ``nn.Linear`` layers (each example's weight gradient is the outer product of
its output gradient and input, so the sum of their squares is one matrix product), the general
``torch.func`` path (``vmap`` of ``grad``: every per-example gradient held at once), and a raw
forward+backward of the same batches. Also the largest difference between the two results,
relative to the largest entry of each parameter.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import cpu_name  # noqa: E402

from memloc.analyses.importance import _linear_importance, _vmap_importance  # noqa: E402
from memloc.core.data import build_data  # noqa: E402
from memloc.core.evaluate import eval_mode  # noqa: E402
from memloc.core.models import build_model  # noqa: E402
from memloc.core.runtime import resolve_device  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="write the table to this Markdown file")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    train = build_data({"dataset": "mnist5k"}).train
    x, y = train.x[:args.examples].to(device), train.y[:args.examples].to(device)
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=tuple(x.shape[1:]), num_classes=10).to(device)
    params = {k: q.detach() for k, q in model.named_parameters()}

    def raw():
        with torch.enable_grad():
            for s in range(0, len(y), args.batch_size):
                F.cross_entropy(model(x[s:s + args.batch_size]), y[s:s + args.batch_size]).backward()

    rows, diff = [], 0.0
    with eval_mode(model):
        for method in ("fisher", "mas"):
            best = {"outer products": [], "torch.func": [], "raw forward+backward": []}
            for _ in range(args.repeats):
                out = {}
                best["outer products"].append(_timed(lambda: out.setdefault(
                    "a", _linear_importance(model, params, x, y, method, args.batch_size))))
                best["torch.func"].append(_timed(lambda: out.setdefault(
                    "b", _vmap_importance(model, params, x, y, method, args.batch_size))))
                best["raw forward+backward"].append(_timed(raw))
            diff = max(diff, max(float((out["a"][k] - out["b"][k]).abs().max() / out["b"][k].abs().max())
                                 for k in out["a"]))
            t = {k: min(v) for k, v in best.items()}
            rows.append(f"| {method} | {t['outer products']:.3f} | {t['torch.func']:.3f} | "
                        f"{t['torch.func'] / t['outer products']:.0f}x | {t['raw forward+backward']:.3f} | "
                        f"{t['outer products'] / t['raw forward+backward']:.1f}x |")
    text = "\n".join([
        "# Importance maps of a Linear-only model: outer products vs torch.func",
        "",
        f"`python scripts/bench_importance.py --examples {args.examples} --repeats {args.repeats}` on "
        f"{cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)} ({device.type}, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}; MNIST-5k MLP "
        f"({sum(q.numel() for q in params.values()):,} parameters), {args.examples} examples, batches of "
        f"{args.batch_size}; best of {args.repeats}, seconds; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| method | outer products s | torch.func s | speed-up | raw forward+backward s | outer products / raw |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Largest difference between the two paths, relative to each parameter's largest entry: {diff:.1e} (float32).",
    ]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
