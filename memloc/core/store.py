"""The result store: one place that owns a run's result of an analysis, for the commands and the library alike.

A result of analysis ``name`` lives at ``RUN/results/<name>.h5``; its work in progress (resumable
part files, :mod:`memloc.scale.parts`) beside it in ``RUN/results/<name>.partial``, deleted when the
result is saved (:meth:`memloc.Result.save`). :class:`ResultStore` does, before any work, what
every writer of a result must: check that it can be written, take the result's lock (one writer
per result; under torchrun rank 0 holds it for all), and decide about an existing result (replace
it with ``overwrite``, continue it when the caller says it is resumable, return it when the caller
says it is complete for these settings, else refuse); after the work it saves.

The commands go through it (:func:`memloc.cli.runner.run_command`), and so does every analysis
declared with :func:`stored`: ``memloc.flip(run, save=True)`` resumes and saves like ``memloc flip RUN``.
"""
from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

from .errors import MemlocError
from .options import check_writable
from .runtime import FileLock, partial_folder, world

__all__ = ["ResultStore", "stored"]


class ResultStore:
    """``RUN/results/<name>.h5`` of ``run`` (a :class:`memloc.Run`): lock, checks and save; a context manager."""

    def __init__(self, run, name: str):
        self.run, self.name = run, name
        self.path = run.results_path(name)
        self.partial = partial_folder(self.path)
        self.lock: FileLock | None = None

    def open(self, *, overwrite: bool = False, what: str = "", rank: int = 0, complete=None, resumable=None):
        """Before any work: None when the result is to be computed (absent, ``overwrite``, or
        ``resumable()``), the saved result when ``complete()`` says it holds these settings; else a
        :class:`MemlocError`. Rank 0 takes the lock (``what``: who is busy, for the message)."""
        check_writable(self.path)
        if rank == 0:
            self.lock = FileLock(self.path.with_name(f".{self.name}.lock"),
                                 f"another {what or self.name} is running on {str(self.run.path)!r}; "
                                 "wait for it to finish")
        if not self.path.exists() or overwrite or (resumable is not None and resumable()):
            return None
        if complete is not None and complete():
            return self.run.result(self.name)
        raise MemlocError(f"{str(self.path)!r} exists (possibly with different settings); use {{overwrite}} to "
                          "replace it", options={"overwrite": True})

    def save(self, result, *, argv=None) -> Path:
        """Write ``result`` in its place with the run's fingerprint (atomically; its work in progress
        is then deleted)."""
        return result.save(self.path, argv=argv, run=self.run)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_run(source, name: str):
    from .run import Run, as_run
    if not isinstance(source, (Run, str, os.PathLike)):
        raise MemlocError(f"save=True stores the {name} result in a run directory: pass a run (a memloc.Run or "
                          f"its path), not a {type(source).__name__}", argument="save")
    return as_run(source, need_checkpoints=False)


def stored(name: str):
    """Decorator of an analysis function whose result ``name`` belongs to a run: adds ``save=False``
    (and ``overwrite=False`` where the function has none). ``save=True`` computes through a
    :class:`ResultStore`: refuses an existing result unless ``overwrite``, holds the lock, saves the
    result to ``RUN/results/<name>.h5`` and returns it (None on ranks > 0, as without ``save``)."""
    def deco(fn):
        sig = inspect.signature(fn)
        own_overwrite = "overwrite" in sig.parameters
        added = [inspect.Parameter("save", inspect.Parameter.KEYWORD_ONLY, default=False)]
        if not own_overwrite:
            added.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False))
        params = list(sig.parameters.values())
        tail = [p for p in params if p.kind == p.VAR_KEYWORD]

        first = params[0].name

        @functools.wraps(fn)
        def wrapper(*args, save: bool = False, **kwargs):
            overwrite = kwargs.get("overwrite", False) if own_overwrite else kwargs.pop("overwrite", False)
            if not save:
                if overwrite and not own_overwrite:
                    raise MemlocError("{overwrite} replaces a saved result: use it with {save}", argument="overwrite",
                                      options={"overwrite": True, "save": True})
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)       # a TypeError for wrong arguments, as without save
            run, rank = _as_run(bound.arguments[first], name), world()[0]
            bound.arguments[first] = run
            with ResultStore(run, name) as store:
                store.open(overwrite=overwrite, what=f"memloc.{fn.__name__}", rank=rank)
                result = fn(*bound.args, **bound.kwargs)
                if rank == 0 and result is not None:
                    store.save(result)
            return result

        wrapper.__signature__ = sig.replace(parameters=[p for p in params if p.kind != p.VAR_KEYWORD] + added + tail)
        return wrapper
    return deco
