"""What the analyses and the Recorder accept as examples, turned into ``(x, y, idx)`` batches.

Accepted: a :class:`memloc.core.data.ExampleSet` or :class:`memloc.core.stream.StreamedSet`; a tuple of
tensors ``(x, y)`` or ``(x, y, idx)``; a torch ``Dataset`` whose items are ``(x, y)`` or
``(x, y, idx)``; a ``DataLoader`` yielding such batches (without ids only when it does not shuffle:
ids are then positions); or any re-iterable of ``(x, y, idx)`` batches. Without ids, example ids are positions ``0..N-1`` in iteration order.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from .data import Data, ExampleSet, make_data
from .errors import MemlocError
from .stream import StreamedSet

__all__ = ["as_batches", "as_data", "WithIds", "EXPECTED"]

EXPECTED = ("an ExampleSet, a tuple of tensors (x, y[, idx]), a torch Dataset of (x, y[, idx]) items, "
            "a DataLoader of (x, y[, idx]) batches, or a re-iterable of (x, y, idx) batches")


class WithIds(Dataset):
    """A dataset of ``(x, y)`` items as ``(x, y, idx)`` items, ``idx`` = position (for training loops)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        return x, y, i


class _Loader:
    """Re-iterable batches of a DataLoader, with position ids when its batches have none."""

    def __init__(self, loader: DataLoader, name: str, device=None):
        self.loader, self.name, self.device = loader, name, device

    def batches(self, batch_size=None):
        start = 0
        for batch in self.loader:
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise MemlocError(f"{self.name}: batches must be (x, y) or (x, y, idx) tuples, got "
                                  f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)}'}")
            x, y = batch[0], batch[1]
            if len(batch) == 3:
                idx = torch.as_tensor(batch[2])
            else:
                if not isinstance(self.loader.sampler, SequentialSampler):
                    raise MemlocError(f"{self.name}: a shuffling DataLoader must yield (x, y, idx) batches "
                                      "with example ids (wrap its dataset in memloc.WithIds)")
                idx = torch.arange(start, start + len(y))
            start += len(y)
            if self.device is not None:
                x, y, idx = x.to(self.device), y.to(self.device), idx.to(self.device)
            yield x, torch.as_tensor(y).long(), idx


class _Batches:
    def __init__(self, iterable, name):
        self.iterable, self.name = iterable, name

    def batches(self, batch_size=None):
        for batch in self.iterable:
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                raise MemlocError(f"{self.name}: expected {EXPECTED}; got batches of type {type(batch).__name__}")
            yield batch


def as_batches(obj, *, batch_size: int = 1024, name: str = "data", device=None):
    """An object with ``.batches(batch_size)`` yielding ``(x, y, idx)`` for any accepted input."""
    if isinstance(obj, (ExampleSet, StreamedSet)):
        return obj if device is None else obj.to(device)
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 3) and all(torch.is_tensor(t) for t in obj):
        x, y = obj[0], obj[1]
        if len(x) != len(y) or (len(obj) == 3 and len(obj[2]) != len(y)):
            raise MemlocError(f"{name}: x, y (and idx) must have the same length, got {[len(t) for t in obj]}")
        ids = obj[2] if len(obj) == 3 else torch.arange(len(y), device=y.device)
        out = ExampleSet(x, y.long(), ids.long())
        return out if device is None else out.to(device)
    if isinstance(obj, DataLoader):
        return _Loader(obj, name, device)
    if isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
                                    and not isinstance(obj, (tuple, list, str, bytes, dict))):
        return _Loader(DataLoader(obj, batch_size=batch_size, shuffle=False), name, device)
    if hasattr(obj, "batches"):
        return obj
    if hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes)) and not hasattr(obj, "__next__"):
        return _Batches(obj, name)
    raise MemlocError(f"{name}: expected {EXPECTED}; got {type(obj).__name__}")


def as_data(obj) -> Data:
    """A :class:`memloc.core.data.Data` (train + test sets with given / true labels) from ``obj``: a Data,
    or a tuple ``(x_train, label_given[, x_test, y_test])`` of tensors (no known noise)."""
    if isinstance(obj, Data):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 4) and all(torch.is_tensor(t) for t in obj):
        return make_data(*obj)
    if isinstance(obj, str):
        raise MemlocError(f"data must be a memloc.core.data.Data, got the string {obj!r}: options are keyword-only "
                          "(e.g. examples='noisy:10')", argument="data")
    raise MemlocError("data must be a memloc.core.data.Data (memloc.make_data(x, y_given, x_test, y_test, "
                      f"label_true=...) builds one) or a tuple (x_train, y_given[, x_test, y_test]) of tensors; "
                      f"got {type(obj).__name__}", argument="data")
