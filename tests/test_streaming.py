"""Streamed data (memloc.core.stream) gives exactly what data held on the device gives.

Streaming is forced on small sets (``stream="on"``) and compared with the in-memory path: the same
batches in the same order, bit-identical training checkpoints and dynamics on the CPU, identical
analyses that read rows directly (grand, flip); a lazily read image folder equals the eagerly
decoded one; the ``auto`` threshold; the error paths of the settings and flags.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import memloc
from memloc.cli import run as cli_run
from memloc.core.data import ExampleSet, build_data
from memloc.core.run import checkpoint_epochs
from memloc.core.stream import ImageFiles, StreamedSet, set_streaming, should_stream, stream_settings, streaming
from memloc.training.train import train
from conftest import needs_cuda

CFG = {"dataset": "digits", "train_size": 600, "model": "mlp", "epochs": 2, "batch_size": 64, "lr": 0.1, "noise": 0.1}


def _same_batches(a, b, seed=None):
    def kw():
        return {} if seed is None else {"shuffle": True, "generator": torch.Generator().manual_seed(seed)}
    got, want = list(b.batches(100, **kw())), list(a.batches(100, **kw()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert all(torch.equal(u, v) for u, v in zip(g, w))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-epoch run trained in memory and streamed."""
    root = tmp_path_factory.mktemp("stream")
    with streaming("off"):
        held = train(root / "held", CFG, device="cpu")
    with streaming("on"):
        streamed = train(root / "streamed", CFG, device="cpu")
    return held, streamed


def test_batches_are_the_same_in_the_same_order():
    held = build_data(CFG, stream="off")
    streamed = build_data(CFG, stream="on")
    assert isinstance(held.train, ExampleSet) and isinstance(streamed.train, StreamedSet) and streamed.streamed
    assert streamed.in_shape == held.in_shape == (1, 8, 8) and streamed.train.x.ndim == 4
    for workers in (0, 2):
        streamed.train.workers = workers
        _same_batches(held.train, streamed.train)
        _same_batches(held.train, streamed.train, seed=5)
    ids = np.array([7, 3, 100])
    for key in (ids, torch.as_tensor(ids), slice(0, 2), 4, -1, held.is_noisy):
        assert torch.equal(streamed.train.x[key], held.train.x[key])
    _same_batches(held.noisy_train, streamed.noisy_train)           # subsets keep their ids
    _same_batches(held.train.with_labels(held.label_true), streamed.train.with_labels(held.label_true))
    back = streamed.to("cpu", stream="off")                          # materialised again
    assert isinstance(back.train, ExampleSet) and torch.equal(back.train.x, held.train.x)


def test_training_streamed_equals_in_memory(runs):
    held, streamed = runs
    epochs = checkpoint_epochs(held.path / "checkpoints")
    assert epochs == checkpoint_epochs(streamed.path / "checkpoints") == [0, 1, 2]
    for e in epochs:
        a, b = held.checkpoint(e), streamed.checkpoint(e)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for when in ("presentation", "end"):
        for name in ("loss", "correct", "margin"):
            np.testing.assert_array_equal(held.dynamics(name, when), streamed.dynamics(name, when))
    for k, v in held.metrics().items():
        np.testing.assert_array_equal(v, streamed.metrics()[k])


def test_analyses_reading_rows_directly(runs):
    held, _ = runs
    with streaming("off"):
        want_scores = memloc.scores(memloc.load(held.path), methods=["grand"], device="cpu")
        want_flip = memloc.flip(memloc.load(held.path), examples="noisy:1,clean:1", max_units=10, repeats=1,
                                device="cpu", resume=None)
    with streaming("on", workers=0):
        run = memloc.load(held.path)
        assert run.data().streamed
        got_scores = memloc.scores(run, methods=["grand"], device="cpu")
        got_flip = memloc.flip(memloc.load(held.path), examples="noisy:1,clean:1", max_units=10, repeats=1,
                               device="cpu", resume=None)
    for name in ("grand",):
        np.testing.assert_array_equal(got_scores[name].values, want_scores[name].values)
    assert (want_flip["status"].values == 0).any()                  # at least one search ran
    for name in want_flip.data_vars:
        np.testing.assert_array_equal(got_flip[name].values, want_flip[name].values)


def test_command_flags(runs, tmp_path, capsys):
    held, _ = runs
    want = memloc.scores(memloc.load(held.path), methods=["grand"], device="cpu")
    before = {k: os.environ.get(k) for k in ("MEMLOC_STREAM", "MEMLOC_WORKERS")}
    got = cli_run("scores", [str(held.path), "--scores", "grand", "--device", "cpu", "--stream", "on",
                             "--workers", "0", "--overwrite"])
    np.testing.assert_array_equal(got["grand"].values, want["grand"].values)
    assert {k: os.environ.get(k) for k in before} == before          # the flags last for the command only
    for flag, value in (("--stream", "maybe"), ("--workers", "-1"), ("--workers", "two")):
        with pytest.raises(SystemExit) as e:
            cli_run("scores", [str(held.path), "--scores", "grand", flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err


def _image_folder(root, n=10, seed=0):
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog", "eel"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            size = (12 + i % 3, 10 + i % 4, 3)
            Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(root / cls / f"{i}.png")


def test_lazy_imagefolder_equals_eager(tmp_path):
    _image_folder(tmp_path / "flat")
    _image_folder(tmp_path / "split" / "train", seed=1)
    _image_folder(tmp_path / "split" / "test", n=4, seed=2)
    for folder, extra in (("flat", {"train_size": 15, "subset": list(range(0, 15, 2))}), ("split", {})):
        cfg = {"dataset": f"imagefolder:{tmp_path / folder}", "img_size": 8, "test_size": 0.3, "noise": 0.2, **extra}
        eager, lazy = build_data(cfg, stream="off"), build_data(cfg, stream="on")
        assert isinstance(lazy.train.source, ImageFiles) and isinstance(lazy.test.source, ImageFiles)
        assert isinstance(eager.train, ExampleSet) and lazy.in_shape == eager.in_shape == (3, 8, 8)
        np.testing.assert_array_equal(lazy.label_given, eager.label_given)
        np.testing.assert_array_equal(lazy.source_index["train"], eager.source_index["train"])
        for part in ("train", "test"):
            a, b = getattr(eager, part), getattr(lazy, part)
            b.workers = 2
            got = list(b.batches(7, shuffle=True, generator=torch.Generator().manual_seed(1)))
            want = list(a.batches(7, shuffle=True, generator=torch.Generator().manual_seed(1)))
            for (gx, gy, gi), (wx, wy, wi) in zip(got, want, strict=True):
                assert torch.equal(gx, wx)      # the same statistics, bit for bit
                assert torch.equal(gy, wy) and torch.equal(gi, wi)


def test_lazy_imagefolder_refuses_unreadable_images_by_name(tmp_path):
    for part in ("train", "test"):
        _image_folder(tmp_path / part / "train", n=4)
        _image_folder(tmp_path / part / "test", n=2, seed=1)
        (tmp_path / part / part / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(memloc.MemlocError, match="broken.png"):     # the statistics pass reads every image
        build_data({"dataset": f"imagefolder:{tmp_path / 'train'}", "img_size": 8}, stream="on")
    data = build_data({"dataset": f"imagefolder:{tmp_path / 'test'}", "img_size": 8}, stream="on")
    data.test.workers = 2
    with pytest.raises(memloc.MemlocError, match="^cannot read image .*broken.png"):   # read in a worker
        list(data.test.batches(3))


def test_auto_streams_above_the_limit(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMLOC_STREAM_LIMIT", raising=False)
    size = 4 * 64 * (600 + 360)               # digits: 600 training and 360 test images of 8 x 8, float32
    with streaming("auto", limit=size - 1):
        assert build_data(CFG).streamed and should_stream(size, "cpu")
    with streaming("auto", limit=size):
        assert not build_data(CFG).streamed and not should_stream(size, "cpu")
    with streaming("auto"):
        assert stream_settings()["limit"] is None
        assert not should_stream(10**15, "cpu")               # data in host memory: nothing to gain on the CPU
        assert should_stream(10**15, "cpu", lazy=True)        # an image folder larger than the RAM: from disk
        assert not should_stream(10**15, "cpu", stream="off") and should_stream(1, "cpu", stream="on")
    _image_folder(tmp_path, n=4)
    cfg = {"dataset": f"imagefolder:{tmp_path}", "img_size": 8, "test_size": 0.25}
    with streaming("auto", limit=4 * 3 * 64 * 12 - 1):      # 12 images of 3 x 8 x 8: read from disk
        assert isinstance(build_data(cfg).train.source, ImageFiles)
    with streaming("auto", limit=4 * 3 * 64 * 12):
        assert isinstance(build_data(cfg).train, ExampleSet)


def test_bad_settings_name_the_argument(monkeypatch):
    before = {k: v for k, v in os.environ.items() if k.startswith("MEMLOC_")}
    for call, match in [(lambda: set_streaming("maybe"), "^stream must be one of auto, on, off"),
                        (lambda: build_data(CFG, stream="yes"), "^stream must be"),
                        (lambda: set_streaming(workers=-1), "^workers must be"),
                        (lambda: set_streaming(workers=1.5), "^workers must be"),
                        (lambda: set_streaming(workers="two"), "^workers must be"),
                        (lambda: set_streaming(limit=-5), "^limit must be"),
                        (lambda: StreamedSet.of(build_data(CFG).train, workers=-2), "^workers must be")]:
        with pytest.raises(memloc.MemlocError, match=match):
            call()
    assert {k: v for k, v in os.environ.items() if k.startswith("MEMLOC_")} == before   # nothing was set
    monkeypatch.setenv("MEMLOC_WORKERS", "-3")        # the environment's values are named as the variables
    with pytest.raises(memloc.MemlocError, match="^MEMLOC_WORKERS must be an integer >= 0, got '-3'"):
        stream_settings()
    monkeypatch.setenv("MEMLOC_WORKERS", "1")
    monkeypatch.setenv("MEMLOC_STREAM", "sometimes")
    with pytest.raises(memloc.MemlocError, match="^environment variable MEMLOC_STREAM must be one of auto, on, off"):
        stream_settings()


@needs_cuda()
def test_cuda_pinned_non_blocking_batches_equal_device_batches(monkeypatch):
    monkeypatch.delenv("MEMLOC_STREAM_LIMIT", raising=False)
    held, streamed = build_data(CFG, "cuda", stream="off"), build_data(CFG, "cuda", stream="on")
    assert held.train.x.is_cuda and streamed.train.device.type == "cuda" and streamed.train.x[[0]].is_cuda
    for workers in (0, 2):
        streamed.train.workers = workers
        _same_batches(held.train, streamed.train, seed=3)
    assert torch.equal(streamed.train.x[[5, 1]], held.train.x[[5, 1]])
    assert not build_data(CFG, "cuda", stream="auto").streamed           # digits fits on any GPU
    assert should_stream(10**15, "cuda") and not should_stream(10**3, "cuda")
    assert build_data(CFG, stream="off").to("cuda", stream="on").streamed
