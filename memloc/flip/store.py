"""Resumable flip searches: finished searches saved in atomically written part files.

A search session writes ``settings.json`` and ``part_NNNNNN.h5`` files into its folder; a rerun
with the same settings reads the parts back and only runs what is missing. Parts with other
settings are never mixed in.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from ..errors import MemlocError
from ..h5 import put
from ..runtime import atomic_path

__all__ = ["csr", "layer_histogram", "write_part", "read_parts", "PartStore"]


def csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows -> (flat int64 values, offsets (M+1,))."""
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return flat, offsets


def layer_histogram(units: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Zeroed units per unit space for CSR rows: ``units`` flat ids, row ``offsets`` (M+1,),
    unit-space ``lengths`` (L,) in id order. Returns (M, L) int32."""
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    space = np.searchsorted(bounds, units, side="right") - 1
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    hist = np.zeros((len(offsets) - 1, len(lengths)), dtype=np.int32)
    np.add.at(hist, (row, space), 1)
    return hist


def write_part(folder: Path, number: int, rows: list[tuple[int, int, np.ndarray, bool, np.ndarray]],
               suffix: str = "") -> None:
    """Save finished searches ``(example id, repeat, units, flipped, collateral)`` as one part file
    (``suffix``: the writing rank's, so processes of one search never write the same file)."""
    flat, offsets = csr([r[2] for r in rows])
    with atomic_path(folder / f"part_{number:06d}{suffix}.h5") as tmp, h5py.File(tmp, "w") as f:
        put(f, "example", np.array([r[0] for r in rows], dtype=np.int64), dims=["search"])
        put(f, "repeat", np.array([r[1] for r in rows], dtype=np.int64), dims=["search"])
        put(f, "flipped", np.array([r[3] for r in rows], dtype=bool), dims=["search"])
        put(f, "collateral", np.array([r[4] for r in rows], dtype=np.float64), dims=["search", "subset"])
        put(f, "ids", flat, dims=["zeroed"])
        put(f, "offsets", offsets, dims=["row"])


def read_parts(folder: Path) -> dict[tuple[int, int], tuple[np.ndarray, bool, np.ndarray]]:
    """{(example id, repeat): (unit ids, flipped, collateral)} of every saved part."""
    done = {}
    for p in sorted(folder.glob("part_*.h5")):
        try:
            with h5py.File(p, "r") as f:
                ex, rep, fl, col = f["example"][:], f["repeat"][:], f["flipped"][:], f["collateral"][:]
                flat, off = f["ids"][:], f["offsets"][:]
        except (OSError, KeyError) as e:
            raise MemlocError(f"cannot read partial result {str(p)!r} ({e}); delete it to redo its searches") from None
        for i in range(len(ex)):
            done[(int(ex[i]), int(rep[i]))] = (flat[off[i]:off[i + 1]], bool(fl[i]), col[i])
    return done


def _canonical(obj) -> object:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class PartStore:
    """The part files of one search (``folder`` None: nothing is saved, nothing resumed).

    ``attach=True`` (the other ranks of a search split across processes, once rank 0 has opened
    the folder) only reads the folder; ``suffix`` names this process's part files."""

    def __init__(self, folder, settings: dict, *, overwrite: bool = False, attach: bool = False, suffix: str = ""):
        self.folder = None if folder is None else Path(folder)
        self.settings = _canonical(settings)
        self.done: dict = {}
        self.number = 0
        self.suffix = suffix
        if self.folder is None:
            return
        if attach:
            if self.stored() != self.settings:
                raise MemlocError(f"{str(self.folder)!r} does not hold this search's settings (rank 0 opens it first)")
            self.reload()
            return
        marker = self.folder / "settings.json"
        if self.folder.exists() and any(not p.name.startswith(("part_", "settings.json")) for p in self.folder.iterdir()):
            raise MemlocError(f"resume folder {str(self.folder)!r} holds files that are not flip parts; "
                              "choose another resume_dir", argument="resume_dir")
        if self.folder.exists() and not marker.exists():
            shutil.rmtree(self.folder)          # killed before its settings were written: nothing saved yet
        elif self.folder.exists() and self.stored() != self.settings:
            if not overwrite:
                raise MemlocError(f"an interrupted search with different settings is saved in {str(self.folder)!r}; "
                                  "rerun it with its settings to continue, or use overwrite=True to start again",
                                  argument="overwrite")
            shutil.rmtree(self.folder)          # same settings are resumed even with overwrite
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            with atomic_path(marker) as tmp:
                tmp.write_text(json.dumps(self.settings, sort_keys=True))
        self.reload()

    def reload(self) -> None:
        """Read every part in the folder again (those other processes wrote too)."""
        self.done = read_parts(self.folder)
        self.number = max([int(p.stem.split("_")[1]) + 1 for p in self.folder.glob("part_*.h5")], default=0)

    def stored(self) -> dict | None:
        return self.saved_settings(self.folder)

    @staticmethod
    def saved_settings(folder) -> dict | None:
        """The settings saved in a parts folder (None if absent or unreadable)."""
        try:
            return json.loads((Path(folder) / "settings.json").read_text())
        except (OSError, ValueError):
            return None

    def add(self, rows: list) -> None:
        """Save finished searches ``(example id, repeat, units, flipped, collateral)``."""
        if not rows:
            return
        if self.folder is not None:
            write_part(self.folder, self.number, rows, self.suffix)
            self.number += 1
        for ex, rep, units, flipped, col in rows:
            self.done[(int(ex), int(rep))] = (units, bool(flipped), np.asarray(col))

    def remove(self) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)
