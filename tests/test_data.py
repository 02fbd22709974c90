import math

import numpy as np
import pytest
import torch
from PIL import Image

from memloc.core.errors import MemlocError as UserError
from memloc.core.data import build_data, load_arrays, make_noisy_labels


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 0.999])
@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_noise_is_exact(rate, kind):
    y = np.repeat(np.arange(10), 101)
    given, noisy = make_noisy_labels(y, rate, num_classes=10, kind=kind, seed=3)
    assert noisy.sum() == math.floor(rate * len(y))
    assert np.all(given[noisy] != y[noisy]) and np.all(given[~noisy] == y[~noisy])
    if kind == "pair":
        assert np.all(given[noisy] == (y[noisy] + 1) % 10)


def test_noise_reproducible_and_seeded():
    y = np.arange(1000) % 7
    a = make_noisy_labels(y, 0.2, num_classes=7, seed=1)
    b = make_noisy_labels(y, 0.2, num_classes=7, seed=1)
    c = make_noisy_labels(y, 0.2, num_classes=7, seed=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_symmetric_noise_uniform_over_other_classes():
    y = np.zeros(40000, dtype=int)
    given, noisy = make_noisy_labels(y, 0.9, num_classes=5, seed=0)
    counts = np.bincount(given[noisy], minlength=5)
    assert counts[0] == 0
    expected = noisy.sum() / 4
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))  # ~5 sigma


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_noise_rate(rate):
    with pytest.raises(UserError, match="noise rate"):
        make_noisy_labels(np.arange(10) % 2, rate, num_classes=2)


def test_mnist5k_stratified_split():
    x_tr, y_tr, x_te, y_te, src_tr, src_te, c = load_arrays("mnist5k")
    assert c == 10 and x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert np.all(np.bincount(y_tr) == 400) and np.all(np.bincount(y_te) == 100)
    assert len(set(src_tr) & set(src_te)) == 0 and len(set(src_tr) | set(src_te)) == 5000
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    again = load_arrays("mnist5k")
    assert np.array_equal(again[4], src_tr)
    other = load_arrays("mnist5k", split_seed=1)
    assert not np.array_equal(other[4], src_tr)


def test_build_data_and_batches():
    d = build_data({"dataset": "digits", "noise": 0.1, "noise_seed": 0})
    n = len(d.train)
    assert d.is_noisy.sum() == math.floor(0.1 * n)
    assert torch.equal(d.train.y, torch.from_numpy(d.label_given))
    seen = []
    for x, y, idx in d.train.batches(100, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert len(x) == len(y) == len(idx)
        assert torch.equal(y, d.train.y[idx])
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(n))
    assert len(d.clean_train) + len(d.noisy_train) == n
    assert abs(float(d.train.x.mean())) < 1e-4  # standardised


def test_train_size_subsample():
    d = build_data({"dataset": "mnist5k", "train_size": 1000, "noise": 0.2})
    assert len(d.train) == 1000 and d.is_noisy.sum() == 200
    assert np.all(np.bincount(d.label_true) == 100)


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'nope'.*mnist5k"):
        load_arrays("nope")
    with pytest.raises(UserError, match="data_root"):
        load_arrays("cifar10")
    with pytest.raises(UserError, match="does not exist"):
        load_arrays("cifar10", data_root=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not found"):
        load_arrays("mnist", data_root=str(tmp_path))


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            img = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    d = build_data({"dataset": f"imagefolder:{tmp_path}", "img_size": 8, "test_size": 0.2, "noise": 0.25})
    assert d.num_classes == 2 and d.in_shape == (3, 8, 8)
    assert len(d.train) == 16 and len(d.test) == 4 and d.is_noisy.sum() == 4
    with pytest.raises(UserError, match="does not exist"):
        load_arrays(f"imagefolder:{tmp_path / 'none'}")
