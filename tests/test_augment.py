"""On-device augmentation (memloc.training.augment) and the paper recipe (memloc.training.recipes): the kernel against
a per-image reference, determinism, resume, "off" = today's training, recipe resolution, errors."""
import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memloc
from memloc.training.augment import augment_batch, augment_generator
from memloc.cli import run as cli_run
from memloc.core.data import make_data, register_data
from memloc.actions.children import _digest, child_path, parent_config
from memloc.training.train import DEFAULTS, LATER_OPTIONS, resolve_config, train
from conftest import train_interrupted, needs_cuda

TINY = {"dataset": "digits", "model": "mlp", "epochs": 3, "batch_size": 64, "lr": 0.1}
AUG = {**TINY, "augment": "crop+flip", "augment_pad": 2}


def _reference(x, kinds, pad, seed):
    """Per image: F.pad + slicing for the crop, torch.flip for the flip; the kernel's draws in its order."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    crop, flip = "crop" in kinds, "flip" in kinds
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g) if crop else torch.zeros(b, dtype=torch.long)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g) if crop else torch.zeros(b, dtype=torch.long)
    mirror = torch.rand(b, generator=g) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    out = []
    for k in range(b):
        im = F.pad(x[k], (pad, pad, pad, pad))[:, dy[k]:dy[k] + h, dx[k]:dx[k] + w] if crop else x[k]
        out.append(torch.flip(im, [-1]) if mirror[k] else im)
    return torch.stack(out), mirror


def _same_runs(a, b):
    """Equal weights at every checkpoint and an equal run.h5, dataset by dataset (dynamics, metrics)."""
    assert a.epochs == b.epochs
    assert all(torch.equal(t, b.checkpoint(e)[k]) for e in a.epochs for k, t in a.checkpoint(e).items())
    with h5py.File(a.path / "run.h5", "r") as fa, h5py.File(b.path / "run.h5", "r") as fb:
        names = []
        fa.visit(names.append)
        assert any(n.startswith("dynamics/presentation/") for n in names)
        for n in names:
            if isinstance(fa[n], h5py.Dataset):
                np.testing.assert_array_equal(fa[n][()], fb[n][()], err_msg=n)


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("kinds", ["crop", "flip", "crop+flip"])
@pytest.mark.parametrize("pad", [1, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_per_image_reference(kinds, pad, dtype):
    x = torch.randn(33, 3, 7, 5, dtype=dtype)             # not square; pad 9 exceeds the image
    got = augment_batch(x, kinds, pad, torch.Generator().manual_seed(pad))
    want, mirror = _reference(x, kinds, pad, pad)
    assert got.shape == x.shape and got.dtype == dtype and torch.equal(got, want)
    if kinds == "flip":
        assert 0 < int(mirror.sum()) < 33


def test_kernel_draws_and_identity():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert augment_batch(x, None, 4, None) is x and augment_batch(x, "none", 4, None) is x
    big = torch.randn(4000, 1, 3, 3)
    mirrored = (augment_batch(big, "flip", 4, torch.Generator().manual_seed(0)) != big).any(dim=(1, 2, 3))
    assert 1800 < int(mirrored.sum()) < 2200          # about half the images flipped
    # every offset 0..2p appears, and each crop keeps an image's pixels in place (zeros elsewhere)
    ones = torch.ones(2000, 1, 3, 3)
    kept = augment_batch(ones, "crop", 1, torch.Generator().manual_seed(1)).sum(dim=(1, 2, 3))
    assert set(kept.tolist()) == {4.0, 6.0, 9.0}      # corner, edge and centre offsets


@needs_cuda()
def test_kernel_same_on_cuda():
    x = torch.randn(64, 3, 32, 32)
    cpu = augment_batch(x, "crop+flip", 4, torch.Generator().manual_seed(3))
    gpu = augment_batch(x.cuda(), "crop+flip", 4, torch.Generator().manual_seed(3))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def test_kernel_errors():
    with pytest.raises(memloc.MemlocError, match="batch of images"):
        augment_batch(torch.zeros(4, 10), "flip", 4, None)
    with pytest.raises(memloc.MemlocError, match="kinds must be"):
        augment_batch(torch.zeros(4, 1, 3, 3), "rotate", 4, None)
    with pytest.raises(memloc.MemlocError, match="kinds must name"):
        augment_batch(torch.zeros(4, 1, 3, 3), ("crop", "blur"), 4, None)


def test_generator_is_a_function_of_seed_and_epoch_only():
    draw = lambda s, e: torch.randint(0, 1 << 30, (8,), generator=augment_generator(s, e))
    torch.manual_seed(123)
    a = draw(0, 3)
    torch.manual_seed(456)                                  # the global stream does not matter
    assert torch.equal(a, draw(0, 3))
    assert not torch.equal(a, draw(0, 4)) and not torch.equal(a, draw(1, 3))


# ----------------------------------------------------------------------------- training
def test_augmented_training_is_deterministic_and_evaluation_unaugmented(tmp_path):
    a, b = train(tmp_path / "a", AUG, device="cpu"), train(tmp_path / "b", AUG, device="cpu")
    _same_runs(a, b)
    plain = train(tmp_path / "plain", TINY, device="cpu")
    assert not torch.equal(a.checkpoint(1)["fc1.weight"], plain.checkpoint(1)["fc1.weight"])
    assert a.config["augment"] == "crop+flip" and a.config["augment_pad"] == 2
    # the epoch-end rows are of the original images: they equal a re-evaluation of the checkpoint
    model, data = a.model(2), a.data()
    with torch.no_grad():
        ref = F.cross_entropy(model(data.train.x), data.train.y, reduction="none").numpy()
    np.testing.assert_allclose(a.dynamics("loss")[2], ref, rtol=1e-5, atol=1e-6)


def test_resume_after_a_kill_is_bit_identical(tmp_path):
    full = train(tmp_path / "full", AUG, device="cpu")

    train_interrupted(tmp_path / "cut", AUG, device="cpu")
    assert memloc.load(tmp_path / "cut").final_epoch == 1
    _same_runs(full, train(tmp_path / "cut", AUG, device="cpu", resume=True))


def test_off_is_todays_training_and_old_configs_keep_their_identity(tmp_path):
    base = train(tmp_path / "base", TINY, device="cpu")
    for value in (None, "none"):
        _same_runs(base, train(tmp_path / str(value), {**TINY, "augment": value}, device="cpu"))
    # the config hash of a default config is the one computed before these options existed
    assert _digest(resolve_config({})) == "46a3ab3d90"
    cfg = resolve_config(TINY)
    assert _digest(cfg) == _digest({k: v for k, v in cfg.items() if k not in LATER_OPTIONS})
    assert _digest({**cfg, "augment": "flip"}) != _digest(cfg)
    # a run stored before the options existed resumes and is its own child
    info = json.loads((base.path / "run.json").read_text())
    for k in LATER_OPTIONS:
        info["config"].pop(k)
    (base.path / "run.json").write_text(json.dumps(info))
    old = memloc.load(base.path)
    assert train(base.path, TINY, device="cpu", resume=True).final_epoch == 3
    assert child_path(old, "same", parent_config(old)) == old.path
    assert child_path(old, "aug", {**parent_config(old), "augment": "crop"}) != old.path


# ----------------------------------------------------------------------------- the paper recipe
def test_recipe_fills_what_is_not_given():
    cfg = resolve_config({"recipe": "paper"})
    want = dict(dataset="cifar10", model="resnet9", width=64, noise=0.1, noise_kind="symmetric", optimizer="sgd",
                lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=512, epochs=100, schedule="onecycle",
                warmup=0.1, augment="crop+flip", augment_pad=4, recipe="paper")
    assert {k: cfg[k] for k in want} == want
    assert resolve_config({"recipe": "paper", "dataset": "svhn"})["augment"] == "crop"   # no flipped digits
    mine = resolve_config({"recipe": "paper", "epochs": 50, "lr": 0.05, "batch_size": 128, "model": "lenet",
                           "augment": None, "warmup": 0.3})
    assert (mine["epochs"], mine["lr"], mine["batch_size"], mine["augment"], mine["warmup"]) == (50, 0.05, 128, None, 0.3)
    assert mine["width"] is None                           # resnet9's width is not forced on another model
    assert resolve_config({"recipe": "paper", "epochs": 50})["warmup"] == 0.2    # the peak stays at epoch 10
    assert resolve_config({"recipe": "paper", "epochs": 4})["warmup"] == 0.5
    assert resolve_config({"recipe": "paper", "labels": "given.npy"})["noise"] == 0.0
    assert resolve_config({})["recipe"] is None and resolve_config({})["lr"] == DEFAULTS["lr"]
    with pytest.raises(memloc.MemlocError, match="recipe 'nope' is unknown; valid: paper"):
        resolve_config({"recipe": "nope"})


def test_recipe_end_to_end_through_the_cli(tmp_path, capsys):
    args = [str(tmp_path / "r"), "--recipe", "paper", "--dataset", "digits", "--epochs", "1", "--width", "4",
            "--lr", "0.05", "--device", "cpu"]                 # 0.05 is memloc's default: given, so it wins
    run = cli_run("train", args)
    cfg = run.config
    assert (cfg["model"], cfg["width"], cfg["epochs"], cfg["lr"]) == ("resnet9", 4, 1, 0.05)
    assert (cfg["batch_size"], cfg["momentum"], cfg["weight_decay"], cfg["warmup"]) == (512, 0.9, 5e-4, 0.5)
    assert (cfg["augment"], cfg["augment_pad"], cfg["noise"], cfg["recipe"]) == ("crop", 4, 0.1, "paper")
    assert cli_run("train", args + ["--resume"]).final_epoch == 1     # the same command resolves the same way
    off = cli_run("train", [str(tmp_path / "off"), "--recipe", "paper", "--dataset", "digits", "--epochs", "1",
                            "--width", "4", "--augment", "none", "--device", "cpu"])
    assert off.config["augment"] is None
    capsys.readouterr()


# ----------------------------------------------------------------------------- bad input
@register_data("augment_test_flat")
def _flat(**_):
    g = np.random.default_rng(0)
    return make_data(g.normal(size=(40, 6)).astype(np.float32), np.arange(40) % 2,
                     g.normal(size=(10, 6)).astype(np.float32), np.arange(10) % 2)


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "augment_test_flat", "--augment", "flip"], "--augment 'flip' needs image inputs (N, C, H, W)"),
    (["--dataset", "digits", "--augment", "rotate"], "--augment must be none, crop, flip or crop+flip"),
    (["--dataset", "digits", "--augment", "crop", "--augment-pad", "0"], "--augment-pad"),
    (["--recipe", "nope"], "--recipe 'nope' is unknown; valid: paper"),
])
def test_bad_input_is_one_line_exit_2(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_run("train", [str(tmp_path / "r"), *argv, "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err and match in err, err
    assert not (tmp_path / "r").exists()
    with pytest.raises(memloc.MemlocError, match="needs image inputs"):
        train(tmp_path / "lib", {"dataset": "augment_test_flat", "augment": "crop", "epochs": 1})
