"""``memloc demo OUT``: the whole pipeline on the embedded default, from training to report.

``python -m memloc demo OUT [--quick]`` trains an MLP on MNIST-5k with 10% symmetric label noise,
then runs gradient accounting, layer rewinding, layer retraining, unit zeroing (flip) on a sample
of noisy and clean examples, the per-example scores, noise detection, label issues found without
ground truth and a retraining without them, Fisher importance and unlearning, a second run with
example-tied dropout evaluated in test and drop mode, and the reports; then a language model's part
(a 2-layer GPT on TinyMem sequences, a quarter of them noisy: which sequences it reproduces, rewinding,
the neurons that hold them, removing them all, its report); it ends with a summary of where each result
lives. Full: about 4.5 minutes on 2 CPU cores (267 s measured, 189 s of it training the
example-tied-dropout lenet); ``--quick``: about 1.5 minutes (90 s measured), with fewer epochs and
examples (used by the integration test). Measured 2026-12-03 on 2 AMD EPYC cores at load 0.2-2.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..core.errors import MemlocError
from ..core.registry import Command, command
from . import run

__all__ = ["steps", "demo"]

# (full, quick) settings; the quick ones trade statistical power for time only.
SETTINGS = {
    "epochs": ("30", "15"),
    "grad_epochs": ("all", "0-15:3"),
    "rewind_epochs": ("all", "0-15:5"),
    "retrain_epochs": ("20", "4"),
    "flip_examples": ("noisy:100,clean:100", "noisy:15,clean:15"),
    "etd_epochs": ("40", "8"),
    "unlearn_epochs": ("5", "2"),
    "unlearn_retrain_epochs": ("20", "4"),
    "lm_epochs": ("30", "30"),
    "lm_rewind_epochs": ("0-30:5", "0,15"),
    "lm_localise_methods": ("zero_out,activations,grad_x_act,greedy,random", "zero_out,greedy,random"),
}


def steps(out: Path, quick: bool, device: str) -> list[tuple[str, str, list[str]]]:
    """The demo's commands as ``(title, module, argv)``, in order."""
    s = {k: v[int(quick)] for k, v in SETTINGS.items()}
    run, etd, lm = str(out / "mnist5k-mlp"), str(out / "mnist5k-lenet-etd"), str(out / "tinymem-gpt")
    dev = ["--device", device]
    return [
        ("train the MLP on MNIST-5k with 10% label noise", "train",
         [run, "--dataset", "mnist5k", "--model", "mlp", "--noise", "0.1", "--epochs", s["epochs"], *dev]),
        ("per-layer gradients of clean and noisy examples", "gradients", [run, "--checkpoints", s["grad_epochs"], *dev]),
        ("rewind each layer to earlier checkpoints", "rewind", [run, "--checkpoints", s["rewind_epochs"], *dev]),
        ("retrain each layer on clean data", "retrain", [run, "--epochs", s["retrain_epochs"], *dev]),
        ("zero units until predictions flip", "flip", [run, "--examples", s["flip_examples"], *dev]),
        ("per-example memorisation scores", "scores", [run, *dev]),
        ("noise detection by every score", "detect", [run]),
        ("label issues without ground truth (ranked list as CSV)", "issues",
         [run, "--out", str(out / "mnist5k-mlp-issues.csv"), *dev]),
        ("drop the flagged examples and retrain (one seed, no cleanlab baseline)", "clean",
         [run, "--seeds", "0", "--no-cleanlab", *dev]),
        ("Fisher importance of clean vs noisy examples", "importance", [run, *dev]),
        ("unlearn the memorised labels with every method (one seed)", "unlearn",
         [run, "--seeds", "0", "--epochs", s["unlearn_epochs"], "--retrain-epochs", s["unlearn_retrain_epochs"], *dev]),
        ("report", "report", [run]),
        ("train lenet (width 4) with example-tied dropout after every ReLU", "train",
         [etd, "--dataset", "mnist5k", "--model", "lenet", "--width", "4", "--noise", "0.1",
          "--epochs", s["etd_epochs"], "--etd-after", "features.1,features.4,classifier.1,classifier.3",
          "--p-gen", "0.2", "--p-mem", "0.05", *dev]),
        ("example-tied dropout: test vs drop mode", "dropout", [etd, *dev]),
        ("report (dropout run)", "report", [etd]),
        ("train a 2-layer GPT on TinyMem sequences, a quarter of them noisy", "train",
         [lm, "--dataset", "tinymem:increment", "--model", "gpt", "--n-layer", "2", "--d-model", "32", "--n-head", "2",
          "--n-train", "64", "--n-test", "32", "--seq-len", "16", "--suffix-len", "4", "--noise", "0.25",
          "--duplicate", "2", "--epochs", s["lm_epochs"], "--batch-size", "8", "--lr", "0.003", "--weight-decay", "0", *dev]),
        ("which sequences the language model reproduces", "memorisation", [lm, *dev]),
        ("rewind each layer of the language model", "rewind", [lm, "--checkpoints", s["lm_rewind_epochs"], *dev]),
        ("which MLP neurons hold the memorised sequences", "localise-neurons",
         [lm, "--methods", s["lm_localise_methods"], *dev]),
        ("remove every memorised sequence at once", "mitigate",
         [lm, "--methods", "greedy,fine_tune_greedy,fine_tune,random", *dev]),
        ("report (language model)", "report", [lm]),
    ]


def demo(out, *, quick: bool = False, device: str = "auto", overwrite: bool = False) -> Path:
    """Run every step of :func:`steps` (each through its command); returns ``out``."""
    out = Path(out)
    plan = steps(out, quick, device)
    own = {Path(a[0]).name for _, name, a in plan if name == "train"} | {"mnist5k-mlp-issues.csv"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own) if out.is_dir() else []
    if out.exists() and (not out.is_dir() or foreign):
        what = "is not a folder" if not out.is_dir() else (
            "is a run directory" if (out / "run.json").exists() else f"holds files that are not the demo's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''})")
        raise MemlocError(f"{str(out)!r} {what}; the demo writes into a new or empty folder (or one of its own)")
    if overwrite:    # each training step replaces its run (checked and locked by train itself)
        plan = [(t, name, a + ["--overwrite"] if name in ("train", "report") else a) for t, name, a in plan]
    else:            # a rerun in its own folder continues: finished steps are kept, an interrupted training resumed
        for _, name, step_argv in plan:
            if name == "train":
                _check_own_run(step_argv)
    t0 = time.time()
    for i, (title, name, step_argv) in enumerate(plan, 1):
        state = "todo" if overwrite else _state(name, step_argv)
        if state == "done":
            print(f"[{i}/{len(plan)}] {title}: done before, kept", flush=True)
            continue
        step_argv = step_argv + (["--resume"] if state == "resume" else [])
        print(f"[{i}/{len(plan)}] {title}: python -m memloc {name} {' '.join(step_argv)}", flush=True)
        t = time.time()
        run(name, step_argv)
        print(f"[{i}/{len(plan)}] done in {time.time() - t:.1f} s ({time.time() - t0:.0f} s in all)", flush=True)
    print(f"\ndone in {time.time() - t0:.0f} s. Results:")
    for run_dir in sorted({a[0] for _, name, a in plan if name == "train"}):
        print(f"  {run_dir}/run.h5              training dynamics")
        for f in sorted((Path(run_dir) / "results").glob("[!.]*")):
            print(f"  {f}")
        print(f"  {run_dir}/report/report.md   summary with figures")
    return out


def _check_own_run(argv: list[str]) -> None:
    """A demo run already in OUT must be the one this demo trains (the same epochs: not a --quick one for a
    full demo, or the reverse); else a one-line :class:`MemlocError`."""
    from ..core.run import Run
    target = Path(argv[0])
    if not (target / "run.json").is_file():
        return
    stored, wanted = Run(target).config.get("epochs"), int(argv[argv.index("--epochs") + 1])
    if stored != wanted:
        raise MemlocError(f"{str(target)!r} is a demo run of {stored} epochs, this demo trains {wanted} (the other of "
                          "quick and full?): use {overwrite} to replace it, or a new folder", options={"overwrite": True})


def _state(name: str, argv: list[str]) -> str:
    """``done`` (its output exists: a finished run, a result file, a report), ``resume`` (an interrupted
    training) or ``todo``; an interrupted analysis continues from its own partial work when rerun."""
    from ..core.run import Run, is_complete
    target = Path(argv[0])
    if name == "train":
        if not is_complete(target):     # none, or its creation was interrupted: the training step redoes it
            return "todo"
        run = Run(target)
        return "done" if run.final_epoch >= int(run.config.get("epochs", 0)) else "resume"
    if name == "report":
        return "done" if (target / "report" / "report.md").is_file() else "todo"
    return "done" if (target / "results" / f"{command(name).result or name}.h5").is_file() else "todo"


def arguments(p):
    p.add_argument("out", help="output folder (created; a new or empty one, or the folder of an earlier demo, which "
                               "continues: finished steps are kept)")
    p.add_argument("--quick", action="store_true", help="a smaller version, about 1.5 minutes on 2 CPU cores instead of 4.5: fewer epochs and examples")


def execute(args):
    return demo(args.out, quick=args.quick, device=args.device, overwrite=args.overwrite)


def summary(out, args):
    return ""


COMMAND = Command(
    name="demo", group="runs", example="memloc demo OUT --quick", order=170,
    help="the whole pipeline on MNIST-5k with 10% noise, from training to report, and on a TinyMem language model",
    description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""), arguments=arguments, execute=execute,
    summary=summary, takes_run=False, overwrite=True, interrupted="finished steps are kept in OUT",
    overwrite_help="redo every step, replacing the demo's earlier run directories in OUT")
