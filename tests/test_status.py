"""The command line that guides (issue 26 item 4): ``memloc status RUN`` says what a run holds and what to
run next; ``memloc --help`` groups the commands by the order of work; ``memloc train RUN --resume`` reads
the stored options and a larger ``--epochs`` extends a run where that equals training it at once."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import memloc
from memloc.cli import main, run as cli_run
from memloc.core import registry
from memloc.core.errors import MemlocError
from memloc.core.registry import Command
from memloc.core.runtime import FileLock
from memloc.training.train import train

from conftest import results_free_copy, train_interrupted

#: digits, 300 examples, a schedule that does not depend on the number of epochs (extends exactly)
CONSTANT = {"dataset": "digits", "model": "mlp", "train_size": 300, "epochs": 2, "batch_size": 64, "lr": 0.1,
            "schedule": "constant", "noise": 0.2}
FLAGS = ["--dataset", "digits", "--train-size", "300", "--batch-size", "64", "--lr", "0.1", "--schedule", "constant",
         "--noise", "0.2", "--device", "cpu"]


def _exit2(capsys, name, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli_run(name, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _same_run(a, b):
    assert a.epochs == b.epochs
    for e in a.epochs:
        x, y = a.checkpoint(e), b.checkpoint(e)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), e
    for k in ("loss", "correct", "margin"):
        np.testing.assert_array_equal(a.dynamics(k), b.dynamics(k))
        np.testing.assert_array_equal(a.dynamics(k, "presentation"), b.dynamics(k, "presentation"))


def test_status_shows_results_current_and_stale_work_in_progress_locks_and_children(tiny_run, tmp_path, capsys):
    run = results_free_copy(tiny_run, tmp_path / "r")
    st = memloc.status(run)
    assert (st.kind, st.dataset, st.model, st.training, st.planned) == ("image", "digits", "mlp", "complete", 4)
    assert st.epochs == st.checkpoints == list(range(5)) and st.targets == int(run.is_noisy.sum())
    assert st.options == {"epochs": 4, "batch_size": 64, "lr": 0.1, "noise": 0.1}    # those not at their default
    assert st.results == [] and st.next == [f"memloc flip {run.path}"]
    memloc.scores(run, methods=["final_loss"], save=True)
    (run.path / "results" / "flip.partial").mkdir()
    (run.path / "results" / "flip.partial" / "settings.json").write_text('{"examples": "noisy:5"}')
    child = run.path / "children" / "clean-0123456789"
    shutil.copytree(tiny_run.path, child, ignore=shutil.ignore_patterns("results", "children"))
    (child / "checkpoints" / "epoch_0004.pt").unlink()       # killed before its last epoch
    with FileLock(run.path / "results" / ".flip.partial.lock", "busy"):
        st = memloc.status(run.path)
        assert st.locks == {"results/.flip.partial.lock": os.getpid()} and st.busy("flip") == os.getpid()
        assert f"flip, 0 part files saved; being computed now (pid {os.getpid()})" in str(st)
        assert st.next == [f"memloc issues {run.path}", f"memloc report {run.path}"]   # flip is under way
    st = memloc.status(run.path)
    assert [(r.name, r.state, r.config["scores"]) for r in st.results] == [("scores", "current", ["final_loss"])]
    assert [(c.name, c.state, c.epochs, c.planned) for c in st.children] == [(child.name, "interrupted", [0, 1, 2, 3], 4)]
    assert st.locks == {} and st.next[0] == f"memloc flip {run.path}"
    # a result of another run (here: a copy whose run.json differs, as an extended run's does) is stale
    other = tmp_path / "other"
    shutil.copytree(run.path, other)
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**info, "created": "another time"}))
    st = memloc.status(other)
    assert [r.state for r in st.results] == ["stale"] and f"memloc scores {other} --overwrite" in st.next
    memloc.report(other)
    assert memloc.status(other).report == "current"
    # the command prints the same text
    assert main(["status", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run.path}: a classifier's run (dataset digits, model mlp, {run.num_train} examples")
    assert "training: epochs 0-4 of 4, complete; checkpoints 0-4" in out and "child runs: 1 (0 complete)" in out


def test_status_of_a_damaged_run_is_one_line(tiny_run, tmp_path, capsys):
    assert "not a memloc run directory" in _exit2(capsys, "status", [str(tmp_path)])
    run = tmp_path / "r"
    shutil.copytree(tiny_run.path, run, ignore=shutil.ignore_patterns("results", "children"))
    (run / "run.h5").write_bytes(b"not hdf5")
    assert "cannot read" in _exit2(capsys, "status", [str(run)])
    (run / "run.json").write_text("{")
    assert "corrupt" in _exit2(capsys, "status", [str(run)])
    with pytest.raises(MemlocError, match="corrupt"):
        memloc.status(run)
    (run / ".creating").touch()             # a creation killed before epoch 0 was recorded, or still under way
    assert "was interrupted before epoch 0" in _exit2(capsys, "status", [str(run)])
    with FileLock(run / "writer.lock", "busy"):
        assert f"is being created by pid {os.getpid()}" in _exit2(capsys, "status", [str(run)])


def test_a_run_recorded_by_your_own_loop(tiny_run, tmp_path):
    run = tmp_path / "mine"
    shutil.copytree(tiny_run.path, run, ignore=shutil.ignore_patterns("results", "children"))
    info = json.loads((run / "run.json").read_text())
    info["config"] = {"lr": 0.1, "note": "my loop"}             # what a Recorder in a user's loop stores
    (run / "run.json").write_text(json.dumps(info))
    st = memloc.status(run)
    assert (st.training, st.planned, st.options, st.dataset) == ("recorded", None, info["config"], None)
    assert "recorded by your own loop" in str(st) and st.next == [f"memloc flip {run}"]
    with pytest.raises(MemlocError, match="not trained by memloc train"):
        train(run, resume=True)


def test_a_run_without_known_wrong_labels_is_sent_to_issues_not_flip(tiny_run, tmp_path):
    """flip's default searches the noisy examples: a run of your own labels (noise 0) has none, so the
    first suggestion is issues (which needs no ground truth), then clean."""
    import h5py
    run = tmp_path / "own"
    shutil.copytree(tiny_run.path, run, ignore=shutil.ignore_patterns("results", "children"))
    with h5py.File(run / "run.h5", "r+") as f:
        f["examples/label_given"][...] = f["examples/label_true"][...]
        f["examples/is_noisy"][...] = 0
    st = memloc.status(run)
    assert st.targets == 0 and st.next == [f"memloc issues {run}"]
    from memloc.cli.train import summary           # what `memloc train` prints: no "noisy nan"
    assert "no known noisy labels" in summary(memloc.load(run), None)


def test_help_groups_every_command_by_the_order_of_work(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line and not line.startswith((" ", "usage", "order", "memloc"))]
    assert [h.split(" ")[0] for h in headings] == ["runs", "localisation", "finding", "acting", "reporting"]
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()[0] != "e.g."]
    assert sorted(listed) == sorted(registry.commands()) and len(listed) == len(set(listed))
    assert out.count("e.g. memloc ") == len(listed)                   # one example each
    groups = registry.grouped()
    assert {"train", "status"} <= set(groups["runs"]) and "flip" in groups["localisation"]
    assert "issues" in groups["finding"] and "clean" in groups["acting"] and list(groups["reporting"]) == ["report"]
    assert main([]) == 2 and "runs (" in capsys.readouterr().out
    with pytest.raises(MemlocError, match="unknown group 'later'; valid: runs"):
        Command(name="x", help="", description="", arguments=None, execute=None, summary=None, group="later")


def test_every_command_has_an_example_that_parses(capsys):
    from memloc.cli.runner import parser
    examples = registry.examples()
    for name in registry.commands():
        words = examples[name].split()
        assert words[:2] == ["memloc", name], examples[name]
        assert registry.command(name).example == examples[name]      # what --help read from the source
        parser(registry.command(name)).parse_args(words[2:])         # exits 2 on an unknown option
    with pytest.raises(SystemExit):
        cli_run("status", ["--help"])
    assert capsys.readouterr().out.rstrip().endswith("example: memloc status RUN")


def test_resume_reads_the_stored_options_and_more_epochs_extend_exactly(tmp_path, capsys):
    at_once = train(tmp_path / "once", {**CONSTANT, "epochs": 3}, device="cpu")
    # interrupted after epoch 1, then continued from the command line without repeating an option
    train_interrupted(tmp_path / "cut", CONSTANT, epoch=1, device="cpu")
    assert memloc.status(tmp_path / "cut").training == "interrupted"
    assert memloc.status(tmp_path / "cut").next == [f"memloc train {tmp_path / 'cut'} --resume"]
    cli_run("train", [str(tmp_path / "cut"), "--resume", "--device", "cpu"])
    assert memloc.load(tmp_path / "cut").epochs == [0, 1, 2]
    memloc.scores(tmp_path / "cut", methods=["final_loss"], save=True)
    # ... and extended by one epoch: the run trained for 3 epochs at once, bit for bit
    cli_run("train", [str(tmp_path / "cut"), "--resume", "--epochs", "3", *FLAGS])
    extended = memloc.load(tmp_path / "cut")
    _same_run(at_once, extended)
    st = memloc.status(extended)
    assert extended.config["epochs"] == 3 and st.training == "complete" and st.epochs == [0, 1, 2, 3]
    assert [r.state for r in st.results] == ["stale"]       # computed at epoch 2: not this run's final model
    with pytest.raises(MemlocError, match="computed from this run before its run.json changed"):
        extended.result("scores")
    # refusals: one line naming the option with the stored and the given value
    err = _exit2(capsys, "train", [str(tmp_path / "cut"), "--resume", "--lr", "0.3"])
    assert "--lr 0.3 (stored 0.1)" in err
    assert "--epochs 2 is fewer than the 3" in _exit2(capsys, "train", [str(tmp_path / "cut"), "--resume", "--epochs", "2"])
    with pytest.raises(MemlocError, match="noise=0.3 \\(stored 0.2\\)"):
        train(tmp_path / "cut", {"noise": 0.3}, resume=True)
    train(tmp_path / "cycle", {**CONSTANT, "epochs": 1, "schedule": "onecycle"}, device="cpu")
    err = _exit2(capsys, "train", [str(tmp_path / "cycle"), "--resume", "--epochs", "2"])
    assert "schedule 'onecycle'" in err and "would differ from training 2 epochs at once" in err


def test_a_language_model_run_resumes_extends_and_shows_its_status(tmp_path, one_thread, capsys):
    tiny = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 1, "d_model": 16, "n_head": 2, "n_train": 24,
            "n_test": 8, "seq_len": 12, "noise": 0.25, "epochs": 1, "batch_size": 12, "lr": 3e-3, "schedule": "constant"}
    at_once = train(tmp_path / "once", {**tiny, "epochs": 2}, device="cpu")
    train(tmp_path / "lm", tiny, device="cpu")
    cli_run("train", [str(tmp_path / "lm"), "--resume", "--epochs", "2", "--device", "cpu"])
    run = memloc.load(tmp_path / "lm")
    for e in at_once.epochs:
        a, b = at_once.checkpoint(e), run.checkpoint(e)
        assert all(torch.equal(a[k], b[k]) for k in a), e
    np.testing.assert_array_equal(at_once.dynamics("memorised"), run.dynamics("memorised"))
    st = memloc.status(run)
    assert (st.kind, st.training, st.epochs, st.targets) == ("lm", "complete", [0, 1, 2], int(run.is_noisy.sum()))
    assert st.options["d_model"] == 16 and "n_layer" in st.options and "optimizer" not in st.options
    assert "memorisation targets" in str(st) and st.next == [f"memloc localise-neurons {run.path}"]
    assert "--d-model 32 (stored 16)" in _exit2(capsys, "train", [str(run.path), "--resume", "--d-model", "32"])
