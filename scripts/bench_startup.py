"""Start-up cost of memloc beside ``import torch``, measured side by side in one run.

    python scripts/bench_startup.py [--repeats 5] [--out artifacts/bench_startup.md]

Each row is the median wall time of a fresh Python process (the rows alternate within each repeat,
so a busy machine slows them alike):

* ``import torch`` (the floor every command that computes pays), ``import memloc`` (the lazy face),
  ``python -m memloc --help``, and ``import memloc; memloc.train`` (the first use of a name loads
  its module, torch included);
* a 1-epoch ``memloc.train`` on scikit-learn's digits: the seconds from the call to the first
  training batch's forward, less the seconds spent building the data (``build_data``). A global
  forward pre-hook records the first forward of a model in train mode.

Targets (issue 22): ``--help`` under 1 s; ``import memloc`` within 0.5 s of ``import torch``; train
at most 1 s before its first batch beyond loading the data.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import cpu_name  # noqa: E402

FIRST_BATCH = r"""
import json, sys, tempfile, time
import torch, memloc
from memloc.training import train as T
t_data = 0.0
build = T.build_data
def timed(*a, **k):
    global t_data
    t = time.perf_counter(); out = build(*a, **k); t_data += time.perf_counter() - t
    return out
T.build_data = timed
first = {}
def hook(module, args):
    if module.training and "t" not in first:
        first["t"] = time.perf_counter(); first["dynamo"] = "torch._dynamo" in sys.modules
handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    memloc.train(d + "/run", {"dataset": "digits", "model": "mlp", "epochs": 1}, device="cpu")
handle.remove()
print(json.dumps({"before_first_batch": first["t"] - t0, "data": t_data,
                  "overhead": first["t"] - t0 - t_data, "dynamo_before_first_batch": first["dynamo"]}))
"""

ROWS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import memloc": [sys.executable, "-c", "import memloc"],
    "python -m memloc --help": [sys.executable, "-m", "memloc", "--help"],
    "import memloc; memloc.train (first use)": [sys.executable, "-c", "import memloc; memloc.train"],
}


def wall(argv) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per row (medians are reported)")
    p.add_argument("--out", default="artifacts/bench_startup.md", help="Markdown table to write")
    args = p.parse_args(argv)
    times = {k: [] for k in ROWS}
    train = []
    for _ in range(args.repeats):
        for name, cmd in ROWS.items():
            times[name].append(wall(cmd))
        out = subprocess.run([sys.executable, "-c", FIRST_BATCH], check=True, capture_output=True, text=True)
        train.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_s = med["import torch"]
    rows = [[k, f"{v:.2f}", f"{v - torch_s:+.2f}"] for k, v in med.items()]
    over = statistics.median(t["overhead"] for t in train)
    rows.append(["memloc.train 1 epoch: call -> first batch, less data loading", f"{over:.2f}", ""])
    rows.append(["  (of which data loading)", f"{statistics.median(t['data'] for t in train):.2f}", ""])
    dynamo = sum(t["dynamo_before_first_batch"] for t in train)
    verdict = [f"- `python -m memloc --help`: {med['python -m memloc --help']:.2f} s (target < 1 s: "
               f"{'met' if med['python -m memloc --help'] < 1 else 'NOT met'})",
               f"- `import memloc` - `import torch`: {med['import memloc'] - torch_s:+.2f} s (target <= +0.5 s: "
               f"{'met' if med['import memloc'] - torch_s <= 0.5 else 'NOT met'})",
               f"- train before its first batch beyond the data: {over:.2f} s (target <= 1 s: "
               f"{'met' if over <= 1 else 'NOT met'}); torch._dynamo loaded before the first batch in "
               f"{dynamo} of {len(train)} runs"]
    import torch
    lines = [f"# Start-up (`python scripts/bench_startup.py --repeats {args.repeats}`)\n",
             f"Median of {args.repeats} fresh processes per row (seconds; the rows alternate).\n",
             f"Machine: {cpu_name()}, {__import__('os').cpu_count()} cores, torch {torch.__version__}, CPU.\n",
             "| what | seconds | vs import torch |", "|---|---:|---:|", *[f"| {' | '.join(r)} |" for r in rows], "",
             *verdict]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
