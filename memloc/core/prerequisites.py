"""What a reader of a saved result says when the result is missing: one line naming the command (and the
library call) that makes it first, for every reader alike (:func:`missing_result`, :func:`needed_result`),
and the command line itself for a report's list of what is still to run (:func:`command_line`)."""
from __future__ import annotations

import inspect
import shlex
from pathlib import Path

from . import registry
from .errors import MemlocError

__all__ = ["command_line", "missing_result", "needed_result"]


def _maker(name: str) -> tuple[str | None, str | None]:
    """(the command that writes ``results/<name>.h5``, the library call that does, ``memloc.f(run, save=True)``;
    either None where there is none)."""
    found = next((f for f in registry.discover() if f.kind == "analysis" and f.name == name), None)
    command = found.command if found is not None else registry._REGISTERED.get(name) and \
        getattr(registry._REGISTERED[name].command, "name", None)
    try:
        compute = registry.analysis(name).compute
    except MemlocError:
        return command, None
    saves = "save" in inspect.signature(compute).parameters
    return command, f"memloc.{compute.__name__}(run, save=True)" if saves else None


def command_line(run, name: str) -> str:
    """```memloc flip RUN```: the command that writes ``run``'s ``results/<name>.h5`` (in backticks; the
    library call for a result no command writes)."""
    command, library = _maker(name)
    if command is None:
        return f"`{library or f'memloc.{registry.analysis(name).compute.__name__}(...)'}`"
    return f"`memloc {command} {shlex.quote(str(getattr(run, 'path', run)))}`"


def missing_result(run, name: str, needed_by: str | None = None, *, argument: str | None = None,
                   hint: str = "") -> MemlocError:
    """The one-line error for a saved result ``RUN/results/<name>.h5`` that a reader needs and ``run`` lacks,
    naming what to run first: ``no results/flip.h5 in 'RUN': run `memloc flip RUN` first``
    (``needed_by``: who needs it, where the message starts, e.g. ``"methods: zero"``; ``hint``: how to run
    it, e.g. ``"on the forget examples"``)."""
    (command, library), path = _maker(name), str(getattr(run, "path", run))
    file, how = f"results/{name}.h5", command_line(run, name) + (f" {hint}" if hint else "")
    if (Path(path) / file).exists():        # a folder (or another non-file) in its place
        what = f"{needed_by} needs {file}, but" if needed_by else "the result"
        text = f"{what} {file} in {path!r} is a folder, not a result file: delete it and run {how} again"
    else:
        what = f"{needed_by} needs {file}, not in {path!r}" if needed_by else f"no {file} in {path!r}"
        text = f"{what}: run {how} first"
    return MemlocError(text + (f" (in Python: {library})" if library and command else ""), argument=argument)


def needed_result(run, name: str, needed_by: str | None = None, *, argument: str | None = None, hint: str = ""):
    """``run``'s saved result ``name`` (checked to be this run's, :meth:`memloc.Run.result`), or
    :func:`missing_result`'s error."""
    if not run.results_path(name).is_file():
        raise missing_result(run, name, needed_by, argument=argument, hint=hint)
    return run.result(name)
