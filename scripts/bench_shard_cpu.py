"""CPU seconds of each process, 1 process against torchrun with K: a speed-up estimate that a loaded machine does not distort.

    python scripts/bench_shard_cpu.py --run RUN [--analyses retrain] [--procs 2] [--repeats 2]

scripts/bench_shard.py times whole commands on the wall clock; when other jobs share the cores
(the load average well above the core count), wall times measure the share the scheduler gives,
not the work. This script runs the same commands and reads the CPU time (user + system) every
process used (a ``sitecustomize`` records it at exit), minus that of the same command once its
result exists (start-up). The estimate of the work's speed-up is (1 process's CPU seconds) / (the
busiest rank's CPU seconds): it counts imbalance between the ranks and everything a rank computes
(the set-up it repeats, the hand-offs) but not a rank's idle waits nor the slowdown of processes
sharing caches, so it is an upper bound of what the wall clock shows on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_shard import ANALYSES  # noqa: E402

HOOK = """import atexit, os, resource
_out = os.environ.get("MEMLOC_BENCH_CPU")
if _out:
    def _dump():
        r = resource.getrusage(resource.RUSAGE_SELF)
        name = f"{os.environ.get('RANK', 'main')}.{os.getpid()}"
        with open(os.path.join(_out, name), "w") as f:
            f.write(repr(r.ru_utime + r.ru_stime))
    atexit.register(_dump)
"""


def cpu_seconds(cmd, env, check=True) -> dict[str, float]:
    """CPU seconds of every Python process of ``cmd``: ``"main"`` (the command, or torchrun's agent) and each rank."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(cmd, env={**env, "MEMLOC_BENCH_CPU": out}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       check=check)
        return {p.name.split(".")[0]: float(p.read_text()) for p in Path(out).iterdir()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--analyses", default="retrain")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    import memloc
    run = memloc.load(args.run)
    with tempfile.TemporaryDirectory() as hook:
        Path(hook, "sitecustomize.py").write_text(HOOK)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join([hook, str(ROOT), os.environ.get("PYTHONPATH", "")])}
        print("| analysis | 1 process CPU s (start-up) | busiest of K ranks CPU s (start-up) | all ranks CPU s | "
              "estimated speed-up of the work |\n|---|---|---|---|---|")
        for name in args.analyses.split(","):
            base = ["-m", "memloc", name, str(run.path), *ANALYSES[name], "--device", "cpu"]
            one = [sys.executable, *base]
            many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.procs), *base]
            best = {}
            for _ in range(args.repeats):
                for key, cmd in (("one", one), ("many", many)):
                    run.results_path(name).unlink(missing_ok=True)
                    full = cpu_seconds([*cmd, "--overwrite"], env)
                    idle = cpu_seconds(cmd, env, check=False)   # stops at the existing result: start-up only
                    ranks = ["main"] if key == "one" else [str(r) for r in range(args.procs)]
                    work = {r: full[r] - idle[r] for r in ranks}
                    score = max(work.values())
                    if key not in best or score < best[key][0]:
                        best[key] = (score, sum(work.values()), max(idle[r] for r in ranks))
            run.results_path(name).unlink(missing_ok=True)
            (w1, _, s1), (wk, total, sk) = best["one"], best["many"]
            print(f"| {name} | {w1:.1f} ({s1:.1f}) | {wk:.1f} ({sk:.1f}) | {total:.1f} | {w1 / wk:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
