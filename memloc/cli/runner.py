"""The one runner every command goes through, and the option helpers the command modules share."""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path


from ..core.errors import MemlocError
from ..core.results import Result
from ..core.runtime import FileLock, describe_range, in_range, make_dir

__all__ = ["run_command", "check_writable", "Formatter", "number", "add_checkpoints", "add_layers", "add_eval_batch_size", "add_precision", "add_experiment", "seed_table", "mean_se", "positive_int",
           "nonnegative_int", "positive_float", "nonnegative_float", "layer_table", "describe"]


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


def add_precision(p, help: str | None = None) -> None:
    """``--precision fp32|bf16|fp16`` (:mod:`memloc.core.precision`)."""
    from ..core.precision import PRECISIONS
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help=help or "run the forward passes under autocast in bf16 or fp16 (faster on GPUs with "
                                "tensor cores; results close to, not equal to, fp32; conv nets on CUDA also switch "
                                "to channels_last); fp32 (default) computes exactly as without this option")


def add_experiment(p) -> None:
    """``--seeds`` and ``--jobs`` of the retraining experiments (prune, clean, jtt)."""
    p.add_argument("--seeds", type=number(int, 0, 2**32 - 1), nargs="+", default=[0, 1, 2],
                   help="training seeds of the fresh runs (mean and standard error over them)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained in parallel processes (each with cores / jobs threads); finished runs under "
                        "RUN/children are reused, interrupted ones resumed")


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


def check_writable(path) -> None:
    """:class:`MemlocError` unless ``path`` can be written (checked before any work is done)."""
    path = Path(path)
    make_dir(path.parent, "output folder")
    if path.is_dir():
        raise MemlocError(f"output {str(path)!r} is a folder")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MemlocError(f"output {str(path)!r} is not writable")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``memloc X: error: ...``, exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser(name, mod):
    p = _Parser(prog=f"memloc {name}", description=mod.DESCRIPTION, formatter_class=Formatter)
    if getattr(mod, "RUN", True):
        p.add_argument("run", metavar="RUN", help="run directory (written by memloc train or a Recorder)")
    mod.arguments(p)
    if getattr(mod, "RESULT", None) or getattr(mod, "OVERWRITE", False):
        p.add_argument("--overwrite", action="store_true",
                       help=getattr(mod, "OVERWRITE_HELP", "replace an existing result (otherwise an existing "
                                                           "result is an error)"))
    if getattr(mod, "DEVICE", True):
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


def _join_processes(prog: str, mod, args) -> int:
    """Under torchrun, join the process group if the command splits its work (``SHARDED``);
    returns this process's rank (0 outside torchrun)."""
    from ..scale.distributed import init_from_env, requested_world
    if requested_world() == 1:
        return 0
    from ..core.runtime import resolve_device
    device = resolve_device(getattr(args, "device", "cpu") or "cpu")
    return init_from_env(device, command=prog, sharded=getattr(mod, "SHARDED", False))[0]


def run_command(name: str, mod, argv: list[str]):
    """Parse ``argv``, check the output, call ``mod.execute``, save its result, print its summary."""
    parser = _parser(name, mod)
    args = parser.parse_args(argv)
    args.argv = ["memloc", name, *argv]
    prog = f"memloc {name}"
    lock = None
    try:
        rank = _join_processes(prog, mod, args)
        result_name = getattr(mod, "RESULT", None)
        if result_name:
            from ..core.run import as_run
            run = as_run(args.run, need_checkpoints=False)
            args.out = run.results_path(result_name)
            check_writable(args.out)
            lock = None if rank > 0 else FileLock(  # split across processes: rank 0 holds it for all
                args.out.with_name(f".{result_name}.lock"),
                f"another memloc {name} is running on {str(run.path)!r}; wait for it to finish")
            resumable = getattr(mod, "resumable", lambda *a: False)   # an interrupted search with these settings
            if args.out.exists() and not args.overwrite and not resumable(args, run):
                if getattr(mod, "already_done", lambda *a: False)(args, run):
                    if rank == 0:
                        print(f"{prog}: {args.out} is already complete for these settings (nothing to do)",
                              file=sys.stderr)
                    return run.result(result_name)
                raise MemlocError(f"{str(args.out)!r} exists (possibly with different settings); "
                                  "use overwrite=True to replace it")
        from ..core.stream import streaming
        with warnings.catch_warnings(), streaming(getattr(args, "stream", None),
                                                  workers=getattr(args, "workers", None)):
            warnings.showwarning = lambda message, *a, **kw: print(f"{prog}: warning: {message}", file=sys.stderr)
            result = mod.execute(args)
        if rank > 0:
            return result           # rank 0 saves and reports
        if isinstance(result, Result) and result_name:
            result.save(args.out, argv=args.argv)
        if hasattr(mod, "after_save"):          # extra outputs, written once the result is safe
            mod.after_save(result, args)
        text = mod.summary(result, args)
        if text:
            print(text)
        if isinstance(result, Result) and result_name:
            print(f"wrote {args.out}")
        return result
    except MemlocError as e:
        message = _translate(str(e), e.argument, _flags(parser, getattr(mod, "FLAGS", {})))
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {getattr(mod, 'INTERRUPTED', 'nothing was written')}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if lock is not None:
            lock.release()
