"""Given labels from a file: real label noise (e.g. the human-annotated CIFAR-10N label sets).

``memloc train RUN --labels FILE`` trains on the labels in ``FILE`` (one per training example, in
the order of the dataset's training set) while the true labels stay the dataset's own, so
``is_noisy`` = given != true measures the annotators' errors.

Formats: ``.npy`` (an integer array), ``.csv`` / ``.txt`` (one label per line, or two columns
``id,label``; a header line is allowed), ``.pt`` (a tensor, an array, or a dict of them: name the
key as ``FILE.pt:KEY``, e.g. ``CIFAR-10_human.pt:worse_label``).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .errors import MemlocError

__all__ = ["read_labels", "check_labels", "split_key"]


def split_key(spec: str) -> tuple[Path, str | None]:
    """``"file.pt:key"`` -> (Path("file.pt"), "key"); a path without ``:KEY`` -> (path, None)."""
    text = str(spec)
    head, sep, key = text.rpartition(":")
    if sep and head.lower().endswith(".pt") and key and "/" not in key and "\\" not in key:
        return Path(head), key
    return Path(text), None


def _read_csv(path: Path, argument: str) -> np.ndarray:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and not rows[0][-1].strip().lstrip("-").isdigit():
        rows = rows[1:]          # header
    try:
        if rows and len(rows[0]) >= 2:
            ids = np.array([int(r[0]) for r in rows])
            labels = np.array([int(r[-1]) for r in rows])
            if not np.array_equal(np.sort(ids), np.arange(len(ids))):
                raise MemlocError(f"{argument} file {str(path)!r}: the id column must list 0..{len(ids) - 1} once each",
                                  argument=argument)
            return labels[np.argsort(ids)]
        return np.array([int(r[0]) for r in rows])
    except ValueError as e:
        raise MemlocError(f"{argument} file {str(path)!r} has a non-integer entry ({e})", argument=argument) from None


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


def read_labels(spec, *, argument: str = "labels") -> np.ndarray:
    """The labels (or ids) in ``spec`` (a path, ``FILE.pt:KEY``) as an int64 array; one clear error
    otherwise, naming ``argument`` (the option the file was given to)."""
    path, key = split_key(spec)
    if not path.is_file():
        raise MemlocError(f"{argument} file {str(path)!r} does not exist", argument=argument)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise MemlocError(f"cannot read {argument} file {str(path)!r} ({e})", argument=argument) from None
    elif suffix in (".csv", ".txt"):
        labels = _read_csv(path, argument)
    elif suffix == ".pt":
        labels = _read_pt(path, key, argument)
    else:
        raise MemlocError(f"{argument} file {str(path)!r}: unknown format {suffix or '(no suffix)'}; valid: .npy, .csv, "
                          ".txt, .pt", argument=argument)
    labels = np.asarray(labels).squeeze()
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer)
                                or (np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0))):
        raise MemlocError(f"{argument} file {str(path)!r} must hold one integer label per example, got "
                          f"{labels.dtype} of shape {labels.shape}", argument=argument)
    return labels.astype(np.int64)


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
