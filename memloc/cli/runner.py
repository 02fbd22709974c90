"""The one runner every command goes through: parse -> result store checks -> library call -> save -> summary.

A command is a :class:`memloc.core.registry.Command` declaration (next to its analysis, or in
``memloc/cli/<name>.py`` for train, report and demo); its option helpers are in
:mod:`memloc.core.options`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


from ..core.errors import MemlocError, python_spelling
from ..core.options import Formatter, nonnegative_int
from ..core.registry import Command
from ..core.results import Result
from ..core.store import ResultStore

__all__ = ["run_command", "parser"]


def _flags(parser, extra: dict) -> dict[str, str]:
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return {**flags, **extra}


def _message(error: MemlocError, flags: dict[str, str]) -> str:
    """A library error in the command's words: the argument it starts with and the options it advises
    (:attr:`MemlocError.options`) written as this command's flags (from its declaration)."""
    def spell(name, value):
        if name not in flags:
            return python_spelling(name, value)
        return flags[name] if value is True else f"{flags[name]} {value}"

    message = error.render(spell)
    if error.argument in flags and message.startswith(error.argument):
        message = flags[error.argument] + message[len(error.argument):]
    return message


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``memloc X: error: ...``, exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser(cmd: Command) -> _Parser:
    """The argument parser of command ``cmd``: its declared options plus the common ones."""
    p = _Parser(prog=f"memloc {cmd.name}", description=cmd.description, formatter_class=Formatter,
                epilog=f"example: {cmd.example}" if cmd.example else None)
    if cmd.takes_run:
        p.add_argument("run", metavar="RUN", help="run directory (written by memloc train or a Recorder)")
    cmd.arguments(p)
    if cmd.result or cmd.overwrite:
        p.add_argument("--overwrite", action="store_true",
                       help=cmd.overwrite_help or "replace an existing result (otherwise an existing result is "
                                                  "an error)")
    if cmd.device:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where to compute; auto = cuda if available, else cpu")
        p.add_argument("--stream", default=None, choices=["auto", "on", "off"],
                       help="stream the data through a DataLoader instead of holding it on the device; auto: "
                            "when it exceeds half the free GPU memory (image folders larger than half the free "
                            "RAM: read from disk); default $MEMLOC_STREAM, else auto")
        p.add_argument("--workers", type=nonnegative_int, default=None,
                       help="DataLoader processes decoding streamed image files (0: this process); default "
                            "min(4, cpus)")
    return p


def _join_processes(cmd: Command, args) -> int:
    """Under torchrun, join the process group if the command splits its work (``sharded``);
    returns this process's rank (0 outside torchrun)."""
    from ..scale.distributed import init_from_env, requested_world
    if requested_world() == 1:
        return 0
    if not cmd.sharded:             # refused before anything else, rank 0 saying why, once
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            if os.environ.get("RANK", "0") != "0":
                time.sleep(2)       # torchrun stops the others at the first exit: let rank 0 print first
                raise SystemExit(2)
            return init_from_env("cpu", command=f"memloc {cmd.name}", sharded=False, why=cmd.unsplit)[0]   # raises
    from ..core.runtime import resolve_device
    device = resolve_device(getattr(args, "device", "cpu") or "cpu")
    return init_from_env(device, command=f"memloc {cmd.name}", sharded=cmd.sharded)[0]


def run_command(cmd: Command, argv: list[str]):
    """Parse ``argv``, check the output, call ``cmd.execute``, save its result, print its summary."""
    p = parser(cmd)
    args = p.parse_args(argv)
    args.argv = ["memloc", cmd.name, *argv]
    prog = f"memloc {cmd.name}"
    store = None
    try:
        rank = _join_processes(cmd, args)
        if cmd.result:              # the result store: lock (rank 0 for all), existing result, save
            from ..core.run import as_run
            run = as_run(args.run, need_checkpoints=False)
            store = ResultStore(run, cmd.result)
            args.out = store.path
            done = store.open(overwrite=args.overwrite, what=prog, rank=rank,
                              complete=cmd.already_done and (lambda: cmd.already_done(args, run)),
                              resumable=cmd.resumable and (lambda: cmd.resumable(args, run)))
            if done is not None:
                if rank == 0:
                    print(f"{prog}: {args.out} is already complete for these settings (nothing to do)",
                          file=sys.stderr)
                return done
        from ..core.stream import streaming
        with warnings.catch_warnings(), streaming(getattr(args, "stream", None),
                                                  workers=getattr(args, "workers", None)):
            warnings.showwarning = lambda message, *a, **kw: print(f"{prog}: warning: {message}", file=sys.stderr)
            result = cmd.execute(args)
        if rank > 0:
            return result           # rank 0 saves and reports
        saved = isinstance(result, Result) and cmd.result
        if saved:
            store.save(result, argv=args.argv)
        if cmd.after_save:          # extra outputs, written once the result is safe
            cmd.after_save(result, args)
        text = cmd.summary(result, args)
        if text:
            print(text)
        if saved:
            print(f"wrote {args.out}")
        return result
    except MemlocError as e:
        message = _message(e, _flags(p, cmd.flags))
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {cmd.interrupted}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if store is not None:
            store.close()
