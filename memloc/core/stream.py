"""Example sets that do not fit on the device: inputs on the host or on disk, streamed as ``(x, y, idx)``.

A :class:`StreamedSet` has the interface of :class:`memloc.core.data.ExampleSet` (``len``, ``to``,
``subset``, ``with_labels``, ``batches``) and gives the same batches in the same order for the same
generator; only its inputs live elsewhere: a host tensor (:class:`HostRows`) or image files decoded
on access (:class:`ImageFiles`, ``imagefolder:PATH``). Batches come from a ``torch.utils.data.DataLoader``
(worker processes decoding image files, pinned memory on CUDA) and are moved to the device with
``non_blocking=True``; labels and ids stay on the device. ``streamed.x`` reads rows on access
(``x[ids]``, ``x[:2]``, ``x.shape``, ``x.ndim``, ``x.device``), so code written for an ExampleSet's
tensor keeps working.

When to stream (:func:`should_stream`): ``stream="on"`` / ``"off"`` force it; ``"auto"`` (default)
streams a set whose inputs exceed :data:`FRACTION` of the free memory of a CUDA device (on the CPU,
inputs already in memory are never streamed, and image folders larger than that fraction of the
available RAM are read from disk), or an explicit ``limit`` in bytes. The process-wide settings are
the environment variables ``MEMLOC_STREAM`` (auto | on | off), ``MEMLOC_WORKERS`` (loader
processes decoding image files, default ``min(4, cpus)``) and ``MEMLOC_STREAM_LIMIT`` (bytes), set by
:func:`set_streaming` / :func:`streaming` (child processes inherit them) and by the commands'
``--stream`` / ``--workers``.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .errors import MemlocError
from .examples import ExampleSet
from .stream_policy import (FRACTION, STREAM_MODES, _check_workers, should_stream, set_streaming,  # noqa: F401
                            stream_mode, stream_settings, streaming)

__all__ = ["STREAM_MODES", "FRACTION", "StreamedSet", "HostRows", "ImageFiles", "stream_settings",
           "set_streaming", "streaming", "stream_mode", "should_stream"]

# ----------------------------------------------------------------------------- sources of inputs
def _rows(key, n: int):
    """An index (int, slice, bool mask, integer positions; tensor, array or list) -> slice or CPU int64
    tensor of positions (flattened: :meth:`Rows.__getitem__` restores the shape of an index array)."""
    if isinstance(key, slice):
        return key
    if isinstance(key, (int, np.integer)):
        k = int(key) + (n if key < 0 else 0)
        return torch.tensor([k])
    rows = torch.as_tensor(np.asarray(key.cpu() if torch.is_tensor(key) else key))
    if rows.dtype == torch.bool:
        rows = rows.nonzero().flatten()
    return rows.long().reshape(-1)


class HostRows:
    """Inputs held in a host tensor (optionally a selection of its rows), indexed in the main
    process unless a set asks for workers (passing rows through worker processes costs more than it
    saves: 20,000 CIFAR-sized rows in batches of 512 took 1.04 s with 0 workers, 1.26 s with 2)."""

    decodes = False     # the process-wide worker count is for sources that decode

    def __init__(self, tensor: torch.Tensor, rows: torch.Tensor | None = None):
        self.tensor, self.rows = tensor, rows

    def __len__(self):
        return len(self.tensor) if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.tensor.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def take(self, rows) -> "HostRows":
        rows = _rows(rows, len(self))
        rows = torch.arange(len(self))[rows] if isinstance(rows, slice) else rows
        return HostRows(self.tensor, rows if self.rows is None else self.rows[rows])

    def read(self, key) -> torch.Tensor:
        out = self.tensor[key] if self.rows is None else self.tensor[self.rows[key]]
        # a worker returns a fresh tensor (a view would share the whole dataset's storage)
        return out.clone() if get_worker_info() is not None and out._base is not None else out


@functools.lru_cache(maxsize=None)
def _transform(size: int):
    from torchvision import transforms as T
    return T.Compose([T.Resize((size, size)), T.ToTensor()])


STATS_ROWS = 256    # images per chunk of the statistics' sums (the same chunks in memory and streamed)
_STATS: dict = {}   # (paths, size) -> per-channel (mean, std) of the decoded images


class ImageFiles:
    """Images decoded on access: RGB, resized to ``size`` x ``size``, in [0, 1], then standardised
    with ``mean`` / ``std`` (1, 3, 1, 1) when given. An unreadable image is refused by its file name."""

    decodes = True

    def __init__(self, paths, size: int, mean=None, std=None):
        self.paths = np.asarray(paths, dtype=object).reshape(-1)
        self.size, self.mean, self.std = int(size), mean, std

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), 3, self.size, self.size)

    dtype = torch.float32

    def take(self, rows) -> "ImageFiles":
        rows = _rows(rows, len(self))
        return ImageFiles(self.paths[rows if isinstance(rows, slice) else rows.numpy()], self.size,
                          self.mean, self.std)

    def standardised(self, mean: torch.Tensor, std: torch.Tensor) -> "ImageFiles":
        return ImageFiles(self.paths, self.size, mean, std)

    def read(self, key) -> torch.Tensor:
        paths = self.paths[key if isinstance(key, slice) else np.asarray(key)]
        tf, xs = _transform(self.size), []
        from torchvision.datasets.folder import default_loader
        for p in paths:
            try:
                xs.append(tf(default_loader(p)))
            except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for truncated / non-image files
                raise MemlocError(f"cannot read image {p!r} ({type(e).__name__}: {e}); remove or "
                                  "replace it") from None
        x = torch.stack(xs) if xs else torch.zeros((0, 3, self.size, self.size))
        return x if self.mean is None else (x - self.mean) / self.std

    def decoded(self) -> np.ndarray:
        """Every image at once, (N, 3, size, size) float32 (standardised when ``mean`` is set)."""
        return self.read(slice(None)).numpy()

    def channel_stats(self, *, workers: int | None = None, batch_size: int = STATS_ROWS):
        """Per-channel mean and standard deviation of the decoded images (:func:`channel_stats`) from
        one streamed pass (cached per process)."""
        key = (tuple(self.paths), self.size)
        if key not in _STATS:
            raw = ImageFiles(self.paths, self.size)
            _STATS[key] = channel_stats(_loader(raw, _chunks(len(raw), batch_size), workers))
        return _STATS[key]


def channel_stats(chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (unbiased, like ``torch.std``) over ``chunks`` of
    (n, C, H, W) images, each (1, C, 1, 1) float32, from float64 sums: the same numbers bit for bit
    whether the images are decoded in memory or streamed from disk, when the chunks are the same
    (:data:`STATS_ROWS` rows each)."""
    total = squares = None
    n = 0
    for x in chunks:
        x = x.double()
        total = x.sum(dim=(0, 2, 3)) + (0 if total is None else total)
        squares = x.pow(2).sum(dim=(0, 2, 3)) + (0 if squares is None else squares)
        n += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None:
        raise MemlocError("no images to compute the standardisation statistics of")
    mean = total / max(n, 1)
    var = (squares - n * mean ** 2) / max(n - 1, 1)
    return mean.float().view(1, -1, 1, 1), var.clamp_min(0).sqrt().float().clamp_min(1e-8).view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- loading
class _Reader(Dataset):
    """Item ``rows`` (a slice or positions) = those rows of the source: one fetch per batch."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, rows):
        return self.source.read(rows)


def _chunks(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _unwrap(e: MemlocError) -> MemlocError:
    """A MemlocError raised in a loader worker comes back wrapped in a traceback: its own message."""
    text = str(e)
    mark = "MemlocError: "
    return MemlocError(text[text.rindex(mark) + len(mark):].strip()) if mark in text else e


def _loader(source, chunks, workers=None, pin: bool = False):
    """The inputs of ``chunks`` (slices or position tensors) of ``source``, in order, read by
    ``workers`` processes (None: the process-wide setting for sources that decode, else 0)."""
    if workers is None:
        workers = stream_settings()["workers"] if source.decodes else 0
    loader = DataLoader(_Reader(source), batch_size=None, sampler=chunks, num_workers=min(workers, len(chunks)),
                        pin_memory=pin)
    it = iter(loader)
    while True:
        try:
            x = next(it)
        except StopIteration:
            return
        except MemlocError as e:
            raise _unwrap(e) from None
        yield x


class Rows:
    """The inputs of a :class:`StreamedSet`, read on access: ``x[i]``, ``x[a:b]``, ``x[ids]`` (ids:
    positions or a mask; tensor, array or list) are tensors on the set's device."""

    def __init__(self, examples: "StreamedSet"):
        self._set = examples

    def __len__(self):
        return len(self._set.source)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._set.source.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    @property
    def device(self) -> torch.device:
        return self._set.device

    @property
    def dtype(self) -> torch.dtype:
        return self._set.source.dtype

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self[[key]][0]
        x = self._set.source.read(_rows(key, len(self))).to(self._set.device, non_blocking=True)
        if not isinstance(key, slice):
            index = np.asarray(key.cpu() if torch.is_tensor(key) else key)
            if index.dtype != bool and index.ndim > 1:     # x[ids] with ids (R, B) -> (R, B, ...)
                x = x.reshape(*index.shape, *x.shape[1:])
        return x

    def __repr__(self):
        return f"Rows(shape={tuple(self.shape)}, device={self.device}, streamed)"


class StreamedSet:
    """Examples whose inputs stay on the host or on disk: ``source`` (:class:`HostRows` or
    :class:`ImageFiles`, (N, ...) inputs), labels ``y`` (N,) and ids ``idx`` (N,) on ``device``.
    ``workers``: loader processes (None: the process-wide setting for image files, 0 for host rows)."""

    def __init__(self, source, y: torch.Tensor, idx: torch.Tensor, device=None, *, workers: int | None = None):
        if len(source) != len(y) or len(idx) != len(y):
            raise MemlocError(f"inputs ({len(source)}), labels ({len(y)}) and ids ({len(idx)}) must have one entry "
                              "per example")
        self.source, self.device = source, torch.device(device) if device is not None else y.device
        self.y, self.idx = y.to(self.device), idx.to(self.device)
        self.workers = None if workers is None else _check_workers(workers)

    @classmethod
    def of(cls, examples, device=None, *, workers: int | None = None) -> "StreamedSet":
        """An ExampleSet's rows streamed from the host."""
        return cls(HostRows(examples.x.cpu()), examples.y, examples.idx,
                   examples.y.device if device is None else device, workers=workers)

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self):
        return (f"StreamedSet(N={len(self)}, x={tuple(self.x.shape)} in {type(self.source).__name__}, "
                f"device={self.device})")

    @property
    def x(self) -> Rows:
        return Rows(self)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.source.shape, dtype=np.int64)) * self.source.dtype.itemsize

    def _new(self, source=None, y=None, idx=None, device=None) -> "StreamedSet":
        return StreamedSet(self.source if source is None else source, self.y if y is None else y,
                           self.idx if idx is None else idx, self.device if device is None else device,
                           workers=self.workers)

    def to(self, device) -> "StreamedSet":
        return self._new(device=device)

    def subset(self, rows) -> "StreamedSet":
        """Rows selected by a boolean mask or integer positions (ids are kept)."""
        rows = _rows(rows, len(self))
        on = rows.to(self.y.device) if torch.is_tensor(rows) else rows
        return self._new(self.source.take(rows), self.y[on], self.idx[on])

    def with_labels(self, y) -> "StreamedSet":
        return self._new(y=torch.as_tensor(np.asarray(y), device=self.y.device).long())

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None):
        """Yield ``(x, y, idx)`` batches like :meth:`memloc.core.data.ExampleSet.batches` (the same order
        for the same ``generator``); inputs are read by the loader and sent with ``non_blocking=True``."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator)
            chunks = [order[s:s + batch_size] for s in range(0, n, batch_size)]
            order_dev = order.to(self.y.device)
            keys = [order_dev[s:s + batch_size] for s in range(0, n, batch_size)]
        else:
            chunks = keys = _chunks(n, batch_size)
        pin = self.device.type == "cuda"
        for key, x in zip(keys, _loader(self.source, chunks, self.workers, pin)):
            yield x.to(self.device, non_blocking=True), self.y[key], self.idx[key]

    def to_memory(self, device=None, *, batch_size: int = 1024):
        """An :class:`memloc.core.data.ExampleSet` holding every input on ``device`` (filled batch by batch)."""
        target = self.to(self.device if device is None else device)
        x = torch.empty(tuple(self.source.shape), dtype=self.source.dtype, device=target.device)
        for key, (xb, _, _) in zip(_chunks(len(self), batch_size), target.batches(batch_size)):
            x[key] = xb
        return ExampleSet(x, target.y, target.idx)
