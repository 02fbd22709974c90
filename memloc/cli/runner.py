"""The one runner every command goes through: parse -> result store checks -> library call -> save -> summary.

A command is a :class:`memloc.core.registry.Command` declaration (next to its analysis, or in
``memloc/cli/<name>.py`` for train, report and demo); its option helpers are in
:mod:`memloc.core.options`.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings


from ..core.errors import MemlocError
from ..core.options import Formatter, check_writable, nonnegative_int
from ..core.registry import Command
from ..core.results import Result
from ..core.runtime import FileLock

__all__ = ["run_command", "parser"]


def _flags(parser, extra: dict) -> dict[str, str]:
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return {**flags, **extra}


def _translate(message: str, argument: str | None, flags: dict[str, str]) -> str:
    """Library argument names -> the command's flags, in a MemlocError message."""
    if argument in flags and message.startswith(argument):
        message = flags[argument] + message[len(argument):]
    for dest, flag in flags.items():   # "overwrite=True" -> "--overwrite", "data_root=DIR" -> "--data-root DIR"
        message = re.sub(rf"\b{re.escape(dest)}=True\b", flag, message)
        message = re.sub(rf"\b{re.escape(dest)}=(?=\S)", flag + " ", message)
    return message


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``memloc X: error: ...``, exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser(cmd: Command) -> _Parser:
    """The argument parser of command ``cmd``: its declared options plus the common ones."""
    p = _Parser(prog=f"memloc {cmd.name}", description=cmd.description, formatter_class=Formatter)
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
    from ..core.runtime import resolve_device
    device = resolve_device(getattr(args, "device", "cpu") or "cpu")
    return init_from_env(device, command=f"memloc {cmd.name}", sharded=cmd.sharded)[0]


def _existing(cmd: Command, args, run, rank: int):
    """The result store's checks before any work: an existing result is returned when complete for
    these settings, continued when resumable, replaced with ``--overwrite``, else an error."""
    if not args.out.exists() or args.overwrite or (cmd.resumable and cmd.resumable(args, run)):
        return None
    if cmd.already_done and cmd.already_done(args, run):
        if rank == 0:
            print(f"memloc {cmd.name}: {args.out} is already complete for these settings (nothing to do)",
                  file=sys.stderr)
        return run.result(cmd.result)
    raise MemlocError(f"{str(args.out)!r} exists (possibly with different settings); use overwrite=True to replace it")


def run_command(cmd: Command, argv: list[str]):
    """Parse ``argv``, check the output, call ``cmd.execute``, save its result, print its summary."""
    p = parser(cmd)
    args = p.parse_args(argv)
    args.argv = ["memloc", cmd.name, *argv]
    prog = f"memloc {cmd.name}"
    lock = None
    try:
        rank = _join_processes(cmd, args)
        if cmd.result:
            from ..core.run import as_run
            run = as_run(args.run, need_checkpoints=False)
            args.out = run.results_path(cmd.result)
            check_writable(args.out)
            lock = None if rank > 0 else FileLock(  # split across processes: rank 0 holds it for all
                args.out.with_name(f".{cmd.result}.lock"),
                f"another memloc {cmd.name} is running on {str(run.path)!r}; wait for it to finish")
            done = _existing(cmd, args, run, rank)
            if done is not None:
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
            result.save(args.out, argv=args.argv, run=run)
        if cmd.after_save:          # extra outputs, written once the result is safe
            cmd.after_save(result, args)
        text = cmd.summary(result, args)
        if text:
            print(text)
        if saved:
            print(f"wrote {args.out}")
        return result
    except MemlocError as e:
        message = _translate(str(e), e.argument, _flags(p, cmd.flags))
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {cmd.interrupted}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if lock is not None:
            lock.release()
