"""The command line, generated from the declarations (:mod:`memloc.core.registry`) and run by one
runner (:mod:`.runner`: parse -> result store checks -> library call -> save -> summary).

``python -m memloc <command> ...``, ``python -m memloc.<command> ...`` and the ``memloc`` console
script all reach :func:`main`. Each analysis declares its command next to its code
(``ANALYSIS = Analysis(command=Command(...))``); train, status, report and demo declare theirs in
this package (``COMMAND = Command(...)``). ``memloc --help`` lists them by group
(:data:`memloc.core.registry.GROUPS`, the order of work) without importing any (nor torch).
A :class:`memloc.MemlocError` becomes one line on stderr and exit status 2; Ctrl-C exit status 130.
"""
from __future__ import annotations

import os
import sys

from ..core import registry

__all__ = ["main", "run", "module_main", "overview"]

#: the order of work, printed under the commands by ``memloc --help``
ORDER = ("order of work: memloc train RUN --dataset digits  ->  memloc flip RUN  ->  memloc scores RUN  ->  "
         "memloc issues RUN  ->  memloc clean RUN  ->  memloc report RUN\n"
         "memloc status RUN says at any point what a run holds and what to run next.")


def overview() -> str:
    """``memloc --help``: the commands grouped by the order of work, each with its one-line help and an
    example (nothing imported)."""
    lines = ["usage: memloc <command> RUN [options]   (memloc <command> --help: its options)"]
    examples = registry.examples()
    for group, names in registry.grouped().items():
        lines += ["", f"{group} ({registry.GROUPS[group]}):"]
        for name, text in names.items():
            lines.append(f"  {name:<17} {text}")
            if examples.get(name):
                lines.append(f"  {'':<17}   e.g. {examples[name]}")
    return "\n".join([*lines, "", ORDER])


def run(name: str, argv=None):
    """Run command ``name`` with ``argv``; returns what it computed (a Result, a Run or a path).

    User errors raise ``SystemExit(2)`` after one line on stderr (as argparse does).
    """
    from .runner import run_command
    if name not in registry.commands():
        print(f"memloc: error: unknown command {name!r}; valid: {', '.join(registry.commands())}", file=sys.stderr)
        raise SystemExit(2)
    return run_command(registry.command(name), list(argv or []))


def main(argv=None) -> int:
    """``memloc <command> [options]``; returns the exit status (errors raise ``SystemExit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())   # the console script finds pkg.module:factory in the current folder too
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0 if argv else 2
    if argv[0] not in registry.commands():
        print(f"memloc: error: unknown command {argv[0]!r}; valid: {', '.join(registry.commands())}", file=sys.stderr)
        return 2
    run(argv[0], argv[1:])
    return 0


def module_main(name: str) -> None:
    """Entry of ``python -m memloc.<name>``."""
    sys.exit(main([name, *sys.argv[1:]]))
