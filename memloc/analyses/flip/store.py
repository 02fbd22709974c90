"""Resumable flip searches: the part-file format of :class:`memloc.scale.parts.Parts` for flip.

Finished searches ``{(example id, repeat): (unit ids, flipped, collateral)}`` are saved as
``part_NNNNNN[_r<rank>].h5`` files (ragged unit ids as flat + offsets) beside ``settings.json``;
:class:`memloc.scale.parts.Parts` opens, resumes and shares the folder.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ...core.h5 import put
from ...scale.parts import Format, read_folder

__all__ = ["csr", "layer_histogram", "write_part", "read_part", "read_parts", "FLIP_PARTS"]


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


def write_part(path: Path, items: dict) -> None:
    """Save finished searches ``{(example id, repeat): (units, flipped, collateral)}`` in one part file."""
    keys, rows = list(items), list(items.values())
    flat, offsets = csr([r[0] for r in rows])
    with h5py.File(path, "w") as f:
        put(f, "example", np.array([k[0] for k in keys], dtype=np.int64), dims=["search"])
        put(f, "repeat", np.array([k[1] for k in keys], dtype=np.int64), dims=["search"])
        put(f, "flipped", np.array([r[1] for r in rows], dtype=bool), dims=["search"])
        put(f, "collateral", np.array([r[2] for r in rows], dtype=np.float64), dims=["search", "subset"])
        put(f, "ids", flat, dims=["zeroed"])
        put(f, "offsets", offsets, dims=["row"])


def read_part(path: Path) -> dict:
    """{(example id, repeat): (unit ids, flipped, collateral)} of one part file."""
    with h5py.File(path, "r") as f:
        ex, rep, fl, col = f["example"][:], f["repeat"][:], f["flipped"][:], f["collateral"][:]
        flat, off = f["ids"][:], f["offsets"][:]
    return {(int(ex[i]), int(rep[i])): (flat[off[i]:off[i + 1]], bool(fl[i]), col[i]) for i in range(len(ex))}


class _FlipFormat(Format):
    suffix = ".h5"

    def value(self, v):
        units, flipped, col = v
        return np.asarray(units, dtype=np.int64), bool(flipped), np.asarray(col)

    def write(self, path, items):
        write_part(path, items)         # looked up when called (the tests replace it)

    def read(self, path):
        return read_part(path)


#: the flip searches' part files
FLIP_PARTS = _FlipFormat()


def read_parts(folder: Path) -> dict:
    """{(example id, repeat): (unit ids, flipped, collateral)} of every saved part."""
    return read_folder(folder, FLIP_PARTS)[0]
