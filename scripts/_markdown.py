"""Shared tail of the experiment scripts: print the tables and write them as Markdown."""
import time
from pathlib import Path


def finish(lines: list[str], started: float, markdown: str | None) -> str:
    """Append the total time, print the text, write it to ``markdown`` when given; returns it."""
    text = "\n".join([*lines, f"\nTotal time: {time.time() - started:.0f} s."]) + "\n"
    print(text)
    if markdown:
        Path(markdown).write_text(text)
    return text


def invocation(script: str, argv=None) -> str:
    """``python scripts/NAME.py ARGS``: the command line that ran ``script`` (its ``__file__``) with ``argv``
    (default the process's own arguments), as the artifacts state it."""
    import sys
    return " ".join([f"python scripts/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def add_common(p, runs_dir: str) -> None:
    """The options every experiment script shares: where runs live, parallel jobs, device, Markdown output."""
    p.add_argument("--runs-dir", default=runs_dir, help="where the runs are written (and reused)")
    p.add_argument("--jobs", type=int, default=1, help="trainings in parallel (processes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--markdown", default=None, help="write the tables to this Markdown file")


def flip_search_arguments(p, out: str) -> None:
    """The options of a flip search on scripts/tinymem_experiment.py's run (lm_zeroing.py, lm_heads.py):
    the run, the Markdown ``out``put, device, threads, clean sequences searched, cap, reference batch, seed."""
    p.add_argument("--run", default="runs/tinymem", help="run directory (reused or continued if it exists)")
    p.add_argument("--out", default=out, help="the markdown tables")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--clean", type=int, default=100, help="clean training sequences to search (drawn with the seed)")
    p.add_argument("--max-units", type=int, default=100, help="give up after this many zeroed units")
    p.add_argument("--ref-batch-size", type=int, default=64, help="reference batch of clean sequences")
    p.add_argument("--seed", type=int, default=0)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else what :mod:`platform` knows)."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device=None) -> str:
    """One line naming the machine: CPU model, cores, torch threads, torch version and ``device``
    (with the GPU's name on CUDA)."""
    import os

    import torch
    where = "CPU" if device is None or str(device) == "cpu" else str(device)
    if str(device).startswith("cuda"):
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    return (f"{cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}, device {where}")
