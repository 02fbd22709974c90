"""Shared command-line plumbing: user errors, ``--device``, progress bars.

Every analysis module exposes ``parse_args(argv)`` and ``main(argv=None)``;
``main`` runs its body inside :func:`user_errors`, so that a user mistake
prints one ``prog: error: ...`` line and exits with status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from tqdm.auto import tqdm

__all__ = ["UserError", "user_errors", "add_device_arg", "resolve_device", "progress", "parser",
           "check_positive"]


class UserError(Exception):
    """A mistake in the user's input (arguments, files, data). Reported without traceback."""


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn :class:`UserError` (and Ctrl-C) into a one-line message and exit status 2 / 130."""
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is saved (rerun to continue where supported)",
              file=sys.stderr)
        raise SystemExit(130) from None


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the help text already speaks of its default or X is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with memloc's conventions (defaults shown in ``--help``)."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)


def check_positive(args, *names: str) -> None:
    """:class:`UserError` unless every ``args.<name>`` (e.g. ``batch_size``) is at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute; auto = cuda if available, else cpu")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a :class:`UserError`."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available (use --device cpu or auto)")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    return torch.device(name)


def progress(iterable=None, **kw):
    """tqdm with memloc defaults: to stderr, hidden when stderr is not a terminal."""
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("disable", None)
    return tqdm(iterable, **kw)
