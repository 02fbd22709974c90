"""The command line: one table of commands and one runner (parse -> library call -> save -> summary).

``python -m memloc <command> ...``, ``python -m memloc.<command> ...`` and the ``memloc`` console
script all reach :func:`main`. Each command module (``memloc.cli.<name>``) defines
``DESCRIPTION``, ``arguments(parser)``, ``execute(args)`` (the library call, returning a
:class:`memloc.Result` or a path) and ``summary(result, args)``; the flags ``RUN`` (takes a run
directory), ``RESULT`` (the result name it saves to ``RUN/results/<name>.h5``) and ``DEVICE``
tell the runner which common options to add. A :class:`memloc.MemlocError` becomes one line on
stderr and exit status 2; Ctrl-C exit status 130.
"""
from __future__ import annotations

import importlib
import os
import sys

__all__ = ["COMMANDS", "main", "run", "module_main", "command_module"]

COMMANDS = {
    "train": "train a model under label noise into a run directory",
    "gradients": "per-layer gradient norms of clean / noisy / all losses and their cosine, per checkpoint",
    "rewind": "rewind one layer at a time to an earlier checkpoint; clean / noisy / test accuracy",
    "retrain": "reset one layer at a time and retrain only it on clean data",
    "flip": "greedy gradient-guided unit zeroing until each example's prediction flips",
    "scores": "per-example memorisation scores (loss, forgetting, EL2N, GraNd, AUM, neuron count...)",
    "detect": "noise detection metrics (AUROC, AP, precision@k) of every score",
    "issues": "rank every example by how likely its label is wrong; flag the suspects (no ground truth)",
    "prune": "train on subsets kept by each score (Data Diet, forgetting) vs random",
    "clean": "drop or relabel the flagged examples and retrain; cleanlab as the baseline",
    "jtt": "just train twice: upweight the early model's errors and retrain",
    "importance": "Fisher (EWC) / MAS parameter importance per layer and unit, clean vs noisy",
    "unlearn": "remove memorised labels: fine-tuning, ascent, EWC / MAS / LwF, unit zeroing, layer retraining",
    "forgetting-order": "train on one part then the other: within-task forgetting, with EWC / MAS / LwF protection",
    "dropout": "evaluate an example-tied-dropout run in train, test and drop mode",
    "report": "figures and a summary page for every result of a run",
    "demo": "the whole pipeline on MNIST-5k with 10% noise, from training to report",
}


def run(name: str, argv=None):
    """Run command ``name`` with ``argv``; returns what it computed (a Result, a Run or a path).

    User errors raise ``SystemExit(2)`` after one line on stderr (as argparse does).
    """
    from .runner import run_command
    if name not in COMMANDS:
        print(f"memloc: error: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    return run_command(name, command_module(name), list(argv or []))


def command_module(name: str):
    """The module of command ``name`` (``forgetting-order`` -> ``memloc.cli.forgetting_order``)."""
    return importlib.import_module(f"memloc.cli.{name.replace('-', '_')}")


def main(argv=None) -> int:
    """``memloc <command> [options]``; returns the exit status (errors raise ``SystemExit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())   # the console script finds pkg.module:factory in the current folder too
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m memloc <command> [options]   (python -m memloc <command> --help)\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<17} {text}")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"memloc: error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    run(argv[0], argv[1:])
    return 0


def module_main(name: str) -> None:
    """Entry of ``python -m memloc.<name>``."""
    sys.exit(main([name, *sys.argv[1:]]))
