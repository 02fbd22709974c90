"""Given labels from a file: real label noise (e.g. the human-annotated CIFAR-10N label sets).

``memloc train RUN --labels FILE`` trains on the labels in ``FILE`` (one per training example, in
the order of the dataset's training set) while the true labels stay the dataset's own, so
``is_noisy`` = given != true measures the annotators' errors.

Formats: ``.npy`` (an integer array), ``.csv`` / ``.txt`` (one label per line, or two columns
``id,label``), ``.pt`` (a tensor, an array, or a dict of them: name the key as ``FILE.pt:KEY``,
e.g. ``CIFAR-10_human.pt:worse_label``). Files of example ids (``subset``, ``upweight_ids``) take the
same formats with one id per line (:func:`read_ids`).

A text file is read exactly or refused with its line number: UTF-8 (a byte-order mark is dropped);
columns separated by commas, semicolons, tabs or spaces (one kind per file); only the first line may
be a header, and only when it is not numeric; every other line holds whole numbers (``3`` or
``3.0``), the same number of columns on every line; empty lines only at the end. In ``id,label``
files the ids are ``0..N-1``, each once. Id files hold distinct, non-negative ids.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch

from .errors import MemlocError

__all__ = ["read_labels", "read_ids", "check_ids", "check_labels", "split_key"]

_WHOLE = re.compile(r"[+-]?\d+(\.0*)?")
_SEPARATORS = (",", ";", "\t")


def split_key(spec: str) -> tuple[Path, str | None]:
    """``"file.pt:key"`` -> (Path("file.pt"), "key"); a path without ``:KEY`` -> (path, None)."""
    text = str(spec)
    head, sep, key = text.rpartition(":")
    if sep and head.lower().endswith(".pt") and key and "/" not in key and "\\" not in key:
        return Path(head), key
    return Path(text), None


def _numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _columns(n: int) -> str:
    return f"{n} column" + "s" * (n != 1)


def _split(lines: list[str]) -> list[list[str]]:
    """The cells of each line: split at the file's separator (the first of , ; tab that occurs), else at spaces."""
    sep = next((s for s in _SEPARATORS if any(s in line for line in lines)), None)
    if sep is None:
        return [line.split() for line in lines]
    return [[c.strip() for c in next(csv.reader([line], delimiter=sep))] for line in lines]     # a row a line


def _read_text(path: Path, argument: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole numbers of a text file as an (rows, columns) int64 array, and each row's line number."""
    name = f"{argument} file {str(path)!r}"
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MemlocError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})", argument=argument) from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()                                 # empty lines at the end
    for i, line in enumerate(lines):
        if not line.strip():
            raise MemlocError(f"{name}: line {i + 1} is empty (a missing entry would shift every line after it)",
                              argument=argument)
    rows = _split(lines)
    start = 1 if rows and not all(map(_numeric, rows[0])) else 0      # a header: the first line, not numeric
    if len(rows) == start:
        raise MemlocError(f"{name} holds no {'ids' if argument != 'labels' else 'labels'}", argument=argument)
    width = len(rows[start])
    values = np.zeros((len(rows) - start, width), dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise MemlocError(f"{name}: line {i + 1} has {_columns(len(row))}, line {start + 1} has {_columns(width)}",
                              argument=argument)
        for j, cell in enumerate(row if i >= start else ()):
            v = int(cell.split(".")[0]) if _WHOLE.fullmatch(cell) else None
            if v is None or abs(v) >= 2**62:
                what = "not a whole number" if v is None else "too large"
                raise MemlocError(f"{name}: line {i + 1} holds {cell!r}, {what}", argument=argument)
            values[i - start, j] = v
    return values, np.arange(start, len(rows)) + 1


def _read_pt(path: Path, key: str | None, argument: str) -> np.ndarray:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # noqa: BLE001 - any unreadable file is the user's to fix
        raise MemlocError(f"cannot read {argument} file {str(path)!r} ({type(e).__name__}: {e})", argument=argument) from None
    if isinstance(obj, dict):
        if key is None or key not in obj:
            what = "name one" if key is None else f"no key {key!r}"
            raise MemlocError(f"{argument} file {str(path)!r} holds a dict ({what}: {', '.join(map(str, obj))}); "
                              f"give it as {path}:KEY", argument=argument)
        obj = obj[key]
    elif key is not None:
        raise MemlocError(f"{argument} file {str(path)!r} is not a dict; drop ':{key}'", argument=argument)
    return np.asarray(obj.cpu() if torch.is_tensor(obj) else obj)


def _whole_array(values, what: str, argument: str) -> np.ndarray:
    """``values`` as a 1-d int64 array of whole numbers (``3.0`` is 3); one line naming the first entry that is not."""
    values = np.asarray(values)
    if values.ndim != 1 and sum(s != 1 for s in values.shape) <= 1:
        values = values.reshape(-1)                 # (N, 1), (1, N) or one number
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise MemlocError(f"{what} must hold one whole number per entry, got {values.dtype} of shape {values.shape}",
                          argument=argument)
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values) | (np.mod(values, 1) != 0) | (np.abs(values) >= 2**53)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise MemlocError(f"{what}: entry {i} is {values[i].item()!r}, not a whole number ({int(bad.sum())} "
                              "in all)", argument=argument)
    elif values.dtype == np.uint64 and values.size and values.max() >= 2**63:
        raise MemlocError(f"{what}: entry {int(values.argmax())} is too large", argument=argument)
    return values.astype(np.int64)


def _read(spec, argument: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The numbers in the file ``spec``: an (rows, columns) array for a text file (with each row's line
    number), a 1-d array otherwise (line numbers None); and the file's name for messages."""
    path, key = split_key(spec)
    name = f"{argument} file {str(path)!r}"
    if not path.is_file():
        raise MemlocError(f"{name} does not exist", argument=argument)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        values, lines = _read_text(path, argument)
        return values, lines, name
    if suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise MemlocError(f"cannot read {name} ({e})", argument=argument) from None
    elif suffix == ".pt":
        values = _read_pt(path, key, argument)
    else:
        raise MemlocError(f"{name}: unknown format {suffix or '(no suffix)'}; valid: .npy, .csv, .txt, .pt",
                          argument=argument)
    return _whole_array(values, name, argument), None, name


def _where(i: int, lines) -> str:
    return f"entry {i}" if lines is None else f"line {lines[i]}"


def _by_id(values: np.ndarray, lines: np.ndarray, name: str, argument: str) -> np.ndarray:
    """The labels of an ``id,label`` table in id order; the ids must be ``0..N-1``, each once."""
    ids, labels = values[:, 0], values[:, 1]
    first = {}
    for i, v in enumerate(ids.tolist()):
        if v < 0:
            raise MemlocError(f"{name}: {_where(i, lines)} has the negative id {v}", argument=argument)
        if v in first:
            j = first[v]
            same = "the same label" if labels[i] == labels[j] else f"labels {labels[j]} and {labels[i]}"
            raise MemlocError(f"{name}: id {v} is on {_where(j, lines)} and again on {_where(i, lines)} ({same})",
                              argument=argument)
        first[v] = i
    if ids.max() >= len(ids):
        missing = np.setdiff1d(np.arange(len(ids)), ids)
        raise MemlocError(f"{name}: the ids must be 0..{len(ids) - 1}, one row each; {len(missing)} of them have "
                          f"no row (first: {int(missing[0])}) and {_where(int(ids.argmax()), lines)} has id "
                          f"{int(ids.max())}", argument=argument)
    return labels[np.argsort(ids)]


def read_labels(spec, *, argument: str = "labels") -> np.ndarray:
    """The labels in ``spec`` (a path, ``FILE.pt:KEY``) as an int64 array in example order (a text file:
    one label per line, or ``id,label`` rows in any order); one clear error otherwise, naming
    ``argument`` (the option the file was given to) and the line or entry at fault."""
    values, lines, name = _read(spec, argument)
    if lines is None or values.shape[1] == 1:
        return values.reshape(-1)
    if values.shape[1] == 2:
        return _by_id(values, lines, name, argument)
    raise MemlocError(f"{name}: line {lines[0]} has {_columns(values.shape[1])}; a labels file holds one label per "
                      "line, or two columns id,label", argument=argument)


def check_ids(ids, *, argument: str, what: str | None = None, lines=None) -> np.ndarray:
    """Example ids (a list / array) as an int64 array: whole, non-negative and distinct; one line
    naming the entry (or the ``lines`` of a file) at fault."""
    what = what or argument
    try:
        ids = _whole_array(ids, what, argument)
    except (TypeError, ValueError) as e:
        if isinstance(e, MemlocError):
            raise
        raise MemlocError(f"{what} must be a list of example ids or a file of them", argument=argument) from None
    if (ids < 0).any():
        i = int(np.flatnonzero(ids < 0)[0])
        raise MemlocError(f"{what}: {_where(i, lines)} holds the negative id {int(ids[i])}", argument=argument)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        v = int(uniq[counts > 1][0])
        i, j = np.flatnonzero(ids == v)[:2]
        raise MemlocError(f"{what}: id {v} is on {_where(int(i), lines)} and again on {_where(int(j), lines)}",
                          argument=argument)
    return ids


def read_ids(spec, *, argument: str) -> np.ndarray:
    """The example ids in the file ``spec`` (one per line / entry), checked by :func:`check_ids`."""
    values, lines, name = _read(spec, argument)
    if lines is not None and values.shape[1] != 1:
        raise MemlocError(f"{name}: line {lines[0]} has {_columns(values.shape[1])}; an ids file holds one id per "
                          "line", argument=argument)
    return check_ids(values.reshape(-1), argument=argument, what=name, lines=lines)


def check_labels(labels, *, num_examples: int, num_classes: int, what: str = "labels") -> np.ndarray:
    """``labels`` as int64, checked: one per training example, every one in ``0..num_classes-1``."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (num_examples,):
        raise MemlocError(f"{what} has {labels.size} entries; the training set has {num_examples} examples",
                          argument="labels")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MemlocError(f"{what}: {int(bad.sum())} labels outside 0..{num_classes - 1} (first: example {i}, "
                          f"label {int(labels[i])})", argument="labels")
    return labels
