"""Trainer, Recorder and run-directory tests (real runs on mnist5k / digits)."""
import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import memloc
from memloc import cli as dispatcher
from memloc.core import registry
from memloc.cli import run as cli_run
from memloc.core.data import build_data
from memloc.core.errors import MemlocError as UserError
from memloc.core.recorder import Recorder
from memloc.training.train import train


def main(argv):
    return cli_run("train", argv)

TINY = {"dataset": "digits", "model": "mlp", "epochs": 4, "batch_size": 64, "lr": 0.1}


def _exit2(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and match in err, err


def test_mlp_memorises_noisy_labels_and_generalises(mlp_run):
    """Acceptance: default MLP on mnist5k, 10% noise: >=99% of noisy labels fit, >=88% test."""
    m = mlp_run.metrics()
    assert m["noisy_accuracy"][-1] >= 0.99
    assert m["test_accuracy"][-1] >= 0.88
    assert m["clean_accuracy"][-1] >= 0.99
    assert mlp_run.epochs == list(range(31))
    assert mlp_run.is_noisy.sum() == 400
    # memorisation comes late: noisy examples are learned after clean ones
    first = lambda acc: int(np.argmax(acc >= 0.9))
    assert first(m["clean_accuracy"]) < first(m["noisy_accuracy"])


def test_dynamics_layout(mlp_run):
    with h5py.File(mlp_run.path / "run.h5") as f:
        assert f.attrs["memloc_schema"] == "memloc.run"
        assert json.loads(f.attrs["config"])["noise"] == 0.1
        for when in ("presentation", "end"):
            for k in ("loss", "correct", "margin"):
                assert f[f"dynamics/{when}/{k}"].shape == (31, 4000)
                assert list(f[f"dynamics/{when}/{k}"].attrs["dims"]) == ["epoch", "example"]
    pres = mlp_run.dynamics("correct", "presentation")
    assert np.all(pres[0] == -1) and np.all(pres[1:] >= 0)  # every example presented every epoch
    loss, margin, correct = (mlp_run.dynamics(k) for k in ("loss", "margin", "correct"))
    assert np.array_equal(correct == 1, margin > 0)
    # epoch-end rows agree with re-evaluating the stored checkpoint
    model, data = mlp_run.model(12), mlp_run.data()
    with torch.no_grad():
        logits = model(data.train.x)
    ref = torch.nn.functional.cross_entropy(logits, data.train.y, reduction="none").numpy()
    np.testing.assert_allclose(loss[12], ref, rtol=1e-5, atol=1e-6)
    # run.h5 labels agree with the rebuilt dataset
    assert np.array_equal(data.label_given, mlp_run.label_given)


def test_resume_after_interrupt_is_identical(tmp_path):
    full = train(tmp_path / "full", TINY)

    def stop_at_2(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", TINY, on_epoch_end=stop_at_2)
    # also lose the middle of epoch 3: a partial epoch must leave no trace
    calls = []

    def die_mid_epoch(model, idx):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return torch.enable_grad()

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", TINY, resume=True, forward_context=die_mid_epoch)
    cut = train(tmp_path / "cut", TINY, resume=True)
    assert cut.epochs == full.epochs
    for e in full.epochs:
        a, b = full.checkpoint(e), cut.checkpoint(e)
        assert all(torch.equal(a[k], b[k]) for k in a), e
    for when in ("presentation", "end"):
        for k in ("loss", "correct", "margin"):
            np.testing.assert_array_equal(full.dynamics(k, when), cut.dynamics(k, when))


def test_cli_resume_and_errors(tmp_path, capsys):
    run = tmp_path / "r"
    args = [str(run), "--dataset", "digits", "--epochs", "2", "--device", "cpu"]
    main(args)
    assert "noisy (memorised)" in capsys.readouterr().out
    _exit2(capsys, args, "already exists")
    _exit2(capsys, args + ["--resume", "--lr", "0.3"], "differ from the stored run")
    main(args + ["--resume"])  # nothing left to do: returns the finished run
    _exit2(capsys, args + ["--overwrite", "--resume"], "exclude each other")
    main(args + ["--overwrite"])  # trains anew into the same directory
    _exit2(capsys, [str(tmp_path), "--dataset", "digits", "--overwrite"], "not deleting them")
    _exit2(capsys, [str(tmp_path / "a"), "--dataset", "nope"], "unknown dataset")
    _exit2(capsys, [str(tmp_path / "b"), "--model", "nope", "--dataset", "digits"], "unknown model")
    _exit2(capsys, [str(tmp_path / "c"), "--dataset", "cifar10", "--data-root", str(tmp_path / "no")], "does not exist")
    _exit2(capsys, [str(tmp_path / "d"), "--dataset", "digits", "--noise", "1.0"], "--noise")
    _exit2(capsys, [str(tmp_path / "e"), "--dataset", "digits", "--noise", "-0.2"], "--noise")
    _exit2(capsys, [str(tmp_path / "f"), "--dataset", "digits", "--epochs", "0"], "--epochs")


def test_corrupt_checkpoint(tmp_path, capsys):
    run = train(tmp_path / "r", {**TINY, "epochs": 2})
    (run.path / "checkpoints" / "epoch_0002.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        run.checkpoint(2)
    with pytest.raises(UserError, match="no checkpoint for epoch 7"):
        run.checkpoint(7)
    _exit2(capsys, [str(run.path), "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--lr", "0.1",
                    "--resume"], "corrupt")
    with pytest.raises(UserError, match="not a memloc run"):
        memloc.load(tmp_path)


def test_recorder_in_a_users_loop(tmp_path):
    """A custom model trained by hand, recorded with Recorder, read back with load(model_fn=...)."""
    data = build_data({"dataset": "digits", "noise": 0.2})
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "mine", model, eval_train=data.train, eval_test=data.test,
                   label_true=data.label_true, label_given=data.label_given, test_labels=data.test.y.numpy())
    for _ in range(3):
        for x, y, idx in data.train.batches(32, shuffle=True):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record_batch(idx, logits, y)
        rec.end_epoch()
    run = memloc.load(tmp_path / "mine", model_fn=make, data=data)
    assert run.epochs == [0, 1, 2, 3] and run.is_noisy.sum() == int(0.2 * len(data.train))
    assert run.metrics()["test_accuracy"][-1] > 0.8
    final = run.model()
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), model.state_dict().values()))
    with pytest.raises(UserError, match="model_fn"):
        memloc.load(tmp_path / "mine").build_model()
    with pytest.raises(UserError, match="already exists"):
        Recorder(tmp_path / "mine", model, eval_train=data.train, label_true=data.label_true)


def test_dispatcher(capsys):
    assert dispatcher.main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert dispatcher.main(["--help"]) == 0
    with pytest.raises(SystemExit) as e:
        dispatcher.main(["train", "--help"])
    assert e.value.code == 0 and "--noise" in capsys.readouterr().out


@pytest.mark.parametrize("command", list(registry.commands()))
def test_every_option_is_explained_in_help(command, capsys, monkeypatch):
    """--help of every command explains each option and shows each default at most once."""
    import argparse
    import re

    class Captured(Exception):
        pass

    def capture(parser, *args, **kw):
        raise Captured(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as e:
        dispatcher.run(command, [])
    parser = e.value.args[0]
    unexplained = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not unexplained, f"{command}: options without help: {unexplained}"
    text = parser.format_help()
    assert not re.search(r"\(default[^()]*\)\s*\(default", text), text


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_memloc_optimisers_match_torch_bit_for_bit_without_loading_dynamo(name):
    """memloc.core.optim's optimisers skip torch.optim's torch._dynamo import (seconds at start-up)
    and update exactly as torch's own classes (with a schedule, zero_grad and a state round trip)."""
    import subprocess
    import sys
    code = f"""
import sys, torch
from memloc.core.optim import make_optimizer, make_schedule
def run(make):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    o = make(m.parameters())
    s = make_schedule(o, 20, "onecycle", 0.3)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for i in range(20):
        o.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); o.step(); s.step()
        if i == 9: o.load_state_dict(o.state_dict())
    return [p.detach().clone() for p in m.parameters()]
ours = run(lambda p: make_optimizer(p, "{name}", lr=0.05))
dynamo = "torch._dynamo" in sys.modules
ref = run(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4) if "{name}" == "sgd"
          else torch.optim.AdamW(p, lr=0.05, weight_decay=5e-4))
print(dynamo, all(torch.equal(a, b) for a, b in zip(ours, ref)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
