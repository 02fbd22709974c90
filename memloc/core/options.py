"""Command-line option helpers the declarations share: argparse types with ranges, common
options (checkpoints, layers, batch sizes, precision, seeds) and the plain-text tables commands print.

They live in the core so an analysis can declare its command next to its code (:mod:`.registry`);
the runner that parses and dispatches is :mod:`memloc.cli.runner`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import MemlocError
from .runtime import describe_range, in_range, make_dir

__all__ = ["Formatter", "number", "positive_int", "nonnegative_int", "positive_float", "nonnegative_float",
           "add_checkpoints", "add_layers", "add_eval_batch_size", "add_precision", "TRAINING_PASSES", "add_experiment",
           "seed_table", "mean_se", "layer_table", "describe", "check_writable"]


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the help text already speaks of its default or X is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def number(kind=float, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: ``kind`` (int / float) in the range, finite; the range is kept on the
    function (``.range``) so tests can derive every option's valid values from the parsers."""
    integer = kind is int
    what = describe_range(low, high, integer=integer, low_open=low_open, high_open=high_open)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not in_range(value, low, high, integer=integer, low_open=low_open, high_open=high_open):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    parse.range = dict(kind=kind, low=low, high=high, low_open=low_open, high_open=high_open)
    return parse


positive_int = number(int, 1)
nonnegative_int = number(int, 0)
positive_float = number(float, 0, low_open=True)
nonnegative_float = number(float, 0)


def add_checkpoints(p, what: str, default="all") -> None:
    p.add_argument("--checkpoints", default=default,
                   help=f"{what}: all, final, or comma-separated checkpoint epochs and ranges, e.g. 0,5,10 or 0-30:5")


def add_layers(p) -> None:
    p.add_argument("--layers", default=None, metavar="NAME,...",
                   help="comma-separated layers to analyse (memloc.core.units.trace names, e.g. fc1,head; an unknown "
                        "name lists the valid ones); default: every layer")


def add_eval_batch_size(p) -> None:
    p.add_argument("--eval-batch-size", type=positive_int, default=1024, help="examples per evaluation forward pass")


#: ``add_precision(p, what=TRAINING_PASSES)``: a command whose work includes training
TRAINING_PASSES = "every forward pass (its trainings' too; fp16 training with a scaled loss)"


def add_precision(p, help: str | None = None, *, what: str | None = None) -> None:
    """``--precision fp32|bf16|fp16`` (:mod:`memloc.core.precision`); ``what``: what runs in that precision,
    for a command that does not run every forward pass of a conv net in channels_last (the default help)."""
    from .precision import PRECISIONS
    if help is None and what is None:
        help = ("run the forward passes under autocast in bf16 or fp16 (faster on GPUs with tensor cores; results "
                "close to, not equal to, fp32; conv nets on CUDA also switch to channels_last); fp32 (default) "
                "computes exactly as without this option")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help=help or f"run {what} under autocast in bf16 or fp16 (faster on GPUs with tensor cores; results "
                                "close to, not equal to, fp32); fp32 (default) computes exactly as without this option")


def add_experiment(p) -> None:
    """``--seeds``, ``--jobs`` and ``--precision`` of the retraining experiments (prune, clean, jtt)."""
    p.add_argument("--seeds", type=number(int, 0, 2**32 - 1), nargs="+", default=[0, 1, 2],
                   help="training seeds of the fresh runs (mean and standard error over them)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained in parallel processes (each with cores / jobs threads); finished runs under "
                        "RUN/children are reused, interrupted ones resumed")
    add_precision(p, what="the experiment's own forward passes (scores, flags, evaluations; the fresh runs train "
                          "in RUN's precision, part of its recipe)")


def seed_table(res, dim: str, variable: str = "test_accuracy") -> str:
    """``name  mean +- s.e. (n seeds)`` per entry of ``dim`` of a (dim, ..., seed) variable."""
    lines = []
    for name in res[dim].values:
        v = res[variable].sel({dim: name}).values
        lines.append(f"{str(name):<12} {mean_se(v)}")
    return "\n".join(lines)


def mean_se(values, digits: int = 4) -> str:
    """``0.9123 +- 0.0021``: the mean and its standard error (the value alone for one value)."""
    import numpy as np
    v = np.asarray(values, dtype=np.float64)
    if v.size == 1:
        return f"{v.mean():.{digits}f}"
    return f"{v.mean():.{digits}f} +- {v.std(ddof=1) / np.sqrt(v.size):.{digits}f}"


def layer_table(names, columns, values, fmt: str = "10.3f") -> str:
    """A plain-text table: one row per layer name, one column per name in ``columns``; values (L, C)."""
    width = max([24] + [len(n) for n in names])
    lines = [f"{'layer':<{width}} " + " ".join(f"{c:>10}" for c in columns)]
    lines += [f"{n:<{width}} " + " ".join(f"{v:{fmt}}" for v in row) for n, row in zip(names, values)]
    return "\n".join(lines)


def describe(row, subsets) -> str:
    """``clean 0.998, noisy 0.120, ...`` for an accuracy row."""
    return ", ".join(f"{k} {v:.3f}" for k, v in zip(subsets, row))


def check_writable(path) -> None:
    """:class:`MemlocError` unless ``path`` can be written (checked before any work is done)."""
    path = Path(path)
    make_dir(path.parent, "output folder")
    if path.is_dir():
        raise MemlocError(f"output {str(path)!r} is a folder")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MemlocError(f"output {str(path)!r} is not writable")
