"""Benchmark per-example gradient norms (GraNd) against one plain forward + backward.

For each model, over the same MNIST-5k examples and batch size, measured side by side in one
process (rounds interleaved, median of the rounds):

* ``plain``: forward + ``loss.backward()`` per batch (batch-summed gradients, the cost of one
  training step without the optimiser);
* ``hooks``: :func:`memloc.analyses.scores.gradnorm.grad_norms` with per-layer norm tricks (the default);
* ``vmap``: ``torch.func.vmap(grad(...))`` over the whole model;
* ``loop``: one forward + backward per example (timed on ``--loop-n`` examples, scaled to N).

Prints and (with ``--out``) writes a Markdown table of times per 1,000 examples and the ratios
hooks / plain (goal: within 3x), loop / hooks and vmap / hooks; also checks that the three
methods agree (float32, rtol 1e-3).

    OMP_NUM_THREADS=1 python scripts/bench_grand.py --out artifacts/bench_grand.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memloc.cli.runner import Formatter  # noqa: E402
from memloc.core.data import build_data  # noqa: E402
from memloc.core.errors import MemlocError  # noqa: E402
from memloc.core.models import build_model  # noqa: E402
from memloc.core.runtime import resolve_device  # noqa: E402
from memloc.analyses.scores.gradnorm import grad_norms  # noqa: E402

OPTIONS = {"resnet9": {"width": 16}}   # a CPU-sized ResNet-9 (batch norm: exercises the BN rule)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_grand.py", formatter_class=Formatter,
                                description="Per-example gradient norms (hooks / vmap / loop) vs one plain "
                                "forward+backward over the same data, side by side.")
    p.add_argument("--models", default="mlp,lenet,resnet9", help="comma-separated model specs")
    p.add_argument("--n", type=int, default=1024, help="examples (MNIST-5k training set)")
    p.add_argument("--loop-n", type=int, default=128, help="examples timed for the per-example loop")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of plain / hooks / vmap")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-vmap", action="store_true", help="skip vmap (slow and memory-hungry for wide MLPs)")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute; auto = cuda if available, else cpu")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(model, x, y, batch_size):
    model.eval()
    for s in range(0, len(y), batch_size):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[s:s + batch_size]), y[s:s + batch_size]).backward()
    model.zero_grad(set_to_none=True)


def timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def bench_model(spec, data, args, device):
    torch.manual_seed(0)
    model = build_model(spec, data.in_shape, data.num_classes, **OPTIONS.get(spec, {})).to(device).eval()
    x, y = data.train.x[:args.n], data.train.y[:args.n]
    xl, yl = x[:args.loop_n], y[:args.loop_n]
    methods = {
        "plain": lambda: plain(model, x, y, args.batch_size),
        "hooks": lambda: grad_norms(model, x, y, method="hooks", batch_size=args.batch_size),
        "loop": lambda: grad_norms(model, xl, yl, method="loop"),
    }
    if not args.no_vmap:
        methods["vmap"] = lambda: grad_norms(model, x, y, method="vmap", batch_size=args.batch_size)
    scale = {"loop": len(y) / len(yl)}
    times = {k: [] for k in methods}
    outs = {}
    for fn in methods.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in methods.items():
            t, outs[name] = timed(fn, device)
            times[name].append(t * scale.get(name, 1.0))
    med = {k: statistics.median(v) for k, v in times.items()}
    ok = np.allclose(outs["hooks"][:len(yl)], outs["loop"], rtol=1e-3) and (
        "vmap" not in outs or np.allclose(outs["hooks"], outs["vmap"], rtol=1e-3))
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": spec + "".join(f" ({k}={v})" for k, v in OPTIONS.get(spec, {}).items()),
            "params": n_params, "per1k": {k: v / len(y) * 1000 for k, v in med.items()},
            "hooks/plain": med["hooks"] / med["plain"], "loop/hooks": med["loop"] / med["hooks"],
            "vmap/hooks": med["vmap"] / med["hooks"] if "vmap" in med else float("nan"), "agree": ok}


def table(rows, args, device) -> str:
    head = ["model", "params", "plain s/1k", "hooks s/1k", "vmap s/1k", "loop s/1k",
            "hooks / plain", "loop / hooks", "vmap / hooks", "agree"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        t = r["per1k"]
        out.append("| " + " | ".join([r["model"], f"{r['params']:,}", f"{t['plain']:.3f}", f"{t['hooks']:.3f}",
                                      f"{t.get('vmap', float('nan')):.3f}", f"{t['loop']:.3f}",
                                      f"{r['hooks/plain']:.2f}x", f"{r['loop/hooks']:.1f}x",
                                      f"{r['vmap/hooks']:.1f}x", "yes" if r["agree"] else "NO"]) + " |")
    env = (f"torch {torch.__version__}, {device}"
           + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
              f", {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
           + f"; N = {args.n} MNIST-5k examples, batch {args.batch_size}, loop timed on {args.loop_n} "
           f"examples and scaled; median of {args.rounds} interleaved rounds")
    return "\n".join(out) + "\n\n" + env + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        data = build_data({"dataset": "mnist5k", "noise": 0.0}, device)
        rows = []
        for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows.append(bench_model(spec, data, args, device))
            print(f"{rows[-1]['model']}: hooks / plain {rows[-1]['hooks/plain']:.2f}x, "
                  f"loop / hooks {rows[-1]['loop/hooks']:.1f}x, vmap / hooks {rows[-1]['vmap/hooks']:.1f}x",
                  flush=True)
        text = table(rows, args, device)
        print(text)
        if args.out:
            cmd = "python scripts/bench_grand.py " + " ".join(sys.argv[1:] if argv is None else argv)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(
                "# GraNd: per-example gradient norms vs one plain forward + backward\n\n"
                f"Made by `{cmd}` (measured side by side in one process).\n\n"
                "Seconds per 1,000 examples. `plain` = forward + `loss.backward()` per batch; `hooks` = "
                "`memloc.analyses.scores.grad_norms` default (per-layer norm tricks from layer inputs and output "
                "gradients; one forward + one backward + per-layer reductions); `vmap` = torch.func "
                "vmap(grad) over the whole model; `loop` = one backward per example. Goal: hooks within 3x "
                "of plain.\n\n" + text)
            print(f"wrote {args.out}")
    except MemlocError as e:   # a user mistake: one line, exit status 2
        print(f"bench_grand.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("bench_grand.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
