"""Resumable work items of an analysis (flip, rewind, retrain), also split across processes.

An analysis whose work falls into independent items (a flip search, a rewound (checkpoint, layer)
cell, a retrained layer) saves each finished item, or a small batch of them, as an atomically
written part file (``part_NNNNNN[_r<rank>]<suffix>``, in the analysis's :class:`Format`: by default
:data:`NPZ`, the items' integer keys and their float64 values) in a folder that also holds
``settings.json``, the analysis settings. A rerun with the same settings
reads the parts back and computes only what is missing; parts made with other settings are never
mixed in (an error, or discarded with ``overwrite``). Under torchrun (:mod:`memloc.scale.distributed`)
rank 0 opens the folder (its errors stop every rank), the other ranks attach to it, each rank
saves its own share and :meth:`Parts.gather` makes every rank's items visible to all. The folder is deleted with the saved
result (``result.parts``, see :meth:`memloc.Result.save`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .distributed import barrier, broadcast, claim, rank_suffix, world
from ..core.errors import MemlocError
from ..core.runtime import FileLock, atomic_path, partial_folder, progress

__all__ = ["Format", "NPZ", "Parts", "parts_folder", "saved_settings", "canonical_settings", "read_folder",
           "Columns", "split_rows"]

SETTINGS = "settings.json"


class Format:
    """How items ``{key (tuple of ints): value}`` are written to and read from one part file."""

    suffix = ".npz"

    def value(self, v):
        """The value as :attr:`Parts.done` holds it (as read back from a file)."""
        return np.asarray(v, dtype=np.float64)

    def write(self, path: Path, items: dict) -> None:
        with open(path, "wb") as f:
            np.savez(f, keys=np.array(list(items), dtype=np.int64), values=np.stack(list(items.values())))

    def read(self, path: Path) -> dict:
        with np.load(path) as f:
            keys, values = f["keys"], f["values"]
        return {tuple(int(k) for k in key): value for key, value in zip(keys, values)}


#: float64 arrays of one shape per item (rewind cells, retrained layers)
NPZ = Format()


def _canonical(obj) -> object:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


#: settings added after part files were first written, with their defaults: a setting at its default
#: is left out, so that parts saved before it existed still resume
LATER_DEFAULTS = {"precision": "fp32"}


def canonical_settings(settings: dict) -> dict:
    """``settings`` as a parts folder stores and compares them (JSON values, later defaults left out)."""
    return _canonical({k: v for k, v in settings.items() if k not in LATER_DEFAULTS or LATER_DEFAULTS[k] != v})


def saved_settings(folder) -> dict | None:
    """The settings saved in a parts folder (None if absent or unreadable)."""
    try:
        return json.loads((Path(folder) / SETTINGS).read_text())
    except (OSError, ValueError):
        return None


def read_folder(folder, fmt: Format = NPZ) -> tuple[dict, int]:
    """Every item saved in ``folder`` and the next free part number."""
    done, number = {}, 0
    for p in sorted(Path(folder).glob(f"part_*{fmt.suffix}")):
        try:
            done.update(fmt.read(p))
        except (OSError, KeyError, ValueError) as e:
            raise MemlocError(f"cannot read partial result {str(p)!r} ({e}); delete it to redo what it holds") from None
        number = max(number, int(p.stem.split("_")[1]) + 1)
    return done, number


def parts_folder(resume, run, name: str):
    """The parts folder an analysis ``name`` of ``run`` (None for a bare model) uses: ``resume``
    itself, or ``RUN/results/<name>.partial`` for ``"auto"`` and, split across processes (the ranks
    share their work through it), for None."""
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise MemlocError(f"resume must be 'auto', None or a folder, got {type(resume).__name__}", argument="resume")
    if resume == "auto" or (resume is None and world()[1] > 1):
        return None if run is None else partial_folder(run.results_path(name))
    return resume


class Parts:
    """The part files of one analysis (``folder`` None: nothing is saved or resumed; one process only).

    ``done`` maps each finished item's key (a tuple of ints) to its value (a float64 array).
    Collective under torchrun: every rank constructs it (rank 0 opens the folder first), every
    rank calls :meth:`gather` once its share is saved. Rank 0 holds a lock on the folder from
    construction to :meth:`release`.
    """

    def __init__(self, folder, settings: dict, *, what: str, overwrite: bool = False, fmt: Format = NPZ):
        self.folder = None if folder is None else Path(folder)
        self.settings = canonical_settings(settings)
        self.what, self.fmt, self.lock = what, fmt, None
        self.done: dict[tuple, np.ndarray] = {}
        self.number = 0
        rank, size = world()
        if self.folder is None:
            if size > 1:
                raise MemlocError(f"{what} split across processes needs a run (or resume) for its part files",
                                  argument="resume")
            return
        try:
            failure = None
            if rank == 0:
                try:
                    self.lock = FileLock(self.folder.parent / f".{self.folder.name}.lock",
                                         f"another {what} is using {str(self.folder)!r}; wait for it to finish")
                    self._open(overwrite)
                except MemlocError as e:
                    failure = e
            # rank 0 has opened (or cleared) the folder, or every rank stops with its error
            failure = broadcast(failure)        # the same error object on every rank (it pickles whole)
            if failure is not None:
                raise failure
            if rank > 0 and saved_settings(self.folder) != self.settings:
                raise MemlocError(f"{str(self.folder)!r} does not hold this {what}'s settings (rank 0 opens it first)")
            self._reload()
            barrier()               # every rank has read the folder before any writes to it (same work lists)
        except BaseException:
            self.release()
            raise

    def _open(self, overwrite: bool) -> None:
        folder = self.folder
        if folder.exists():
            if any(not p.name.startswith(("part_", SETTINGS)) for p in folder.iterdir()):
                raise MemlocError(f"parts folder {str(folder)!r} holds files that are not {self.what} parts; "
                                  "move them away or choose another resume", argument="resume")
            stored = saved_settings(folder)
            if stored is not None and stored != self.settings and not overwrite:
                raise MemlocError(f"an interrupted {self.what} with different settings is saved in {str(folder)!r}; "
                                  "rerun it with its settings to continue, or use {overwrite} to start again",
                                  argument="overwrite", options={"overwrite": True})
            if stored != self.settings:     # other settings (overwrite), or killed before any was saved
                shutil.rmtree(folder)
        if not folder.exists():
            folder.mkdir(parents=True)
            with atomic_path(folder / SETTINGS) as tmp:
                tmp.write_text(json.dumps(self.settings, sort_keys=True))

    def _reload(self) -> None:
        self.done, self.number = read_folder(self.folder, self.fmt)

    def add(self, items: dict) -> None:
        """Save finished items ``{key: value}`` (keys: tuples of ints of one length; values as the format takes)."""
        if not items:
            return
        items = {tuple(int(k) for k in key): self.fmt.value(v) for key, v in items.items()}
        if self.folder is not None:
            with atomic_path(self.folder / f"part_{self.number:06d}{rank_suffix()}{self.fmt.suffix}") as tmp:
                self.fmt.write(tmp, items)
            self.number += 1
        self.done.update(items)

    def gather(self) -> None:
        """Wait for every rank's parts and read them all (nothing to do in one process)."""
        barrier()                   # every rank's parts are written
        if self.folder is not None and world()[1] > 1:
            self._reload()
            barrier()               # every rank has read them before rank 0 may clear the folder (the next pass)

    def release(self) -> None:
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()


class Columns:
    """Named per-row arrays side by side in one float64 row, as :func:`split_rows` keeps them: ``shapes``
    maps each name to the shape of one row's value (``()`` for a number). Exact for float32 / float64
    values, flags and integers below 2**53."""

    def __init__(self, **shapes):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.sizes = [int(np.prod(v, dtype=np.int64)) for v in self.shapes.values()]

    def pack(self, **arrays) -> np.ndarray:
        """(rows, width) float64 from ``arrays`` (each (rows, *shape))."""
        return np.concatenate([np.asarray(arrays[k], dtype=np.float64).reshape(len(arrays[k]), n)
                               for k, n in zip(self.shapes, self.sizes)], axis=1)

    def unpack(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: (rows, *shape) float64}`` of packed ``rows``."""
        cuts = np.cumsum(self.sizes)[:-1]
        return {k: v.reshape(len(rows), *shape) for (k, shape), v in
                zip(self.shapes.items(), np.split(np.asarray(rows, dtype=np.float64), cuts, axis=1))}


def split_rows(n: int, size: int, work, *, folder, settings: dict, what: str, overwrite: bool = False) -> np.ndarray:
    """Work on rows ``0 .. n-1`` in chunks of ``size`` (the batches one process runs): ``work(rows)`` ->
    (len(rows), W) float64 for each chunk, saved as one item of :class:`Parts` in ``folder`` (None:
    nothing saved, one process only; a rerun with the same ``settings`` takes the saved chunks).
    Under torchrun the chunks are claimed by whichever rank is free (:func:`claim`), so a chunk's
    values must depend on its rows alone (seeds per row, never per rank): any number of processes
    gives one process's arrays. Returns the (n, W) rows in order, on every rank. Collective."""
    chunks = [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
    if not chunks:
        return np.zeros((0, 0))
    parts = Parts(folder, {**settings, "rows": n, "chunk": size}, what=what, overwrite=overwrite)
    try:
        for c in progress(claim([c for c in range(len(chunks)) if (c,) not in parts.done]), desc=what,
                          unit="chunk"):
            parts.add({(c,): work(chunks[c])})
        parts.gather()
    finally:
        parts.release()
    return np.concatenate([parts.done[(c,)] for c in range(len(chunks))])
