"""One run trained with DistributedDataParallel under torchrun (2 gloo processes on the CPU) equals
one-process training up to the order of floating-point sums; rank 0 alone writes the run; resuming
under torchrun (a run begun in one process) ends where the uninterrupted run does; batch norm on
CPU processes warns; user mistakes stop every rank with one line."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import memloc
from memloc.cli import run as cli_run
from memloc.scale.distributed import split_bounds
from memloc.core.evaluate import evaluate
from memloc.core.run import checkpoint_epochs
from memloc.training.train import train
from conftest import train_interrupted, needs_cuda, torchrun_steps

pytestmark = pytest.mark.xdist_group("ddp")     # one worker makes the module's torchrun

ROOT = Path(__file__).resolve().parents[1]
# 1,000 digits = 27 x 37 + 1, so every batch splits 19 / 18 and the last one (a single example)
# 1 / 0: slices of unequal size and an empty one. Augmentation (drawn for the whole batch),
# example-tied dropout (ids per rank) and upweighted examples (loss weights) all on.
CFG = {"dataset": "digits", "train_size": 1000, "model": "mlp", "epochs": 2, "batch_size": 37, "lr": 0.1,
       "noise": 0.2, "augment": "crop+flip", "augment_pad": 1, "etd_after": "act1,act2", "p_gen": 0.4,
       "p_mem": 0.2, "upweight": 3.0}
FLAGS = ["--dataset", "digits", "--train-size", "1000", "--model", "mlp", "--epochs", "2", "--batch-size", "37",
         "--lr", "0.1", "--noise", "0.2", "--augment", "crop+flip", "--augment-pad", "1", "--etd-after",
         "act1,act2", "--p-gen", "0.4", "--p-mem", "0.2", "--upweight", "3", "--device", "cpu"]
ATOL = 1e-5     # measured: weights differ by <= 4.5e-8, per-example losses and margins by <= 4.8e-7


def _torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "memloc", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


def _trained(launched, name) -> memloc.Run:
    """The run of the module's torchrun step ``name``, which succeeded."""
    path, step = launched[name]
    step.ok()
    return memloc.load(path)


@pytest.fixture(scope="module")
def launched(reference, ids_file, tmp_path_factory):
    """The module's CPU torchrun, one `memloc train` after another in one process group: {name: (run directory,
    step)} for "two" (a new run), "cut" (a run begun in one process, killed after epoch 1, resumed), "bn" (batch
    norm) and "refused" (the existing reference again, without --resume: last, as it stops both ranks)."""
    folder = tmp_path_factory.mktemp("ddp_torchrun")
    cut, up = folder / "cut", ["--upweight-ids", str(ids_file)]
    train_interrupted(cut, {**CFG, "upweight_ids": str(ids_file)}, device="cpu")
    assert checkpoint_epochs(cut / "checkpoints") == [0, 1]
    runs = {"two": (folder / "two", [*FLAGS, *up]), "cut": (cut, [*FLAGS, *up, "--resume"]),
            "bn": (folder / "bn", [*BN_FLAGS, "--device", "cpu"]), "refused": (reference.path, FLAGS)}
    steps = torchrun_steps(folder / "steps", {name: ["-m", "memloc", "train", path, *flags]
                                              for name, (path, flags) in runs.items()}, cwd=ROOT, step_timeout=240)
    return {name: (path, steps[name]) for name, (path, _) in runs.items()}


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "up.txt"
    path.write_text("\n".join(str(i) for i in range(0, 1000, 7)) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ids_file):
    return train(tmp_path_factory.mktemp("ddp") / "one", {**CFG, "upweight_ids": str(ids_file)}, device="cpu")


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _assert_close(got, want):
    assert want.metrics()["train_accuracy"][-1] > 0.4      # it learns: the equality below is not trivial
    assert _files(got.path) == _files(want.path)       # nothing more (no file of rank 1), nothing less
    assert got.epochs == want.epochs == [0, 1, 2]
    for e in want.epochs:
        a, b = want.checkpoint(e), got.checkpoint(e)
        assert list(a) == list(b)                       # the unwrapped module's keys
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff <= ATOL, (e, diff)
    for when in ("presentation", "end"):
        for name in ("loss", "margin"):
            a, b = want.dynamics(name, when), got.dynamics(name, when)
            assert np.array_equal(np.isnan(a), np.isnan(b))
            assert np.nanmax(np.abs(a - b)) <= ATOL, (when, name, np.nanmax(np.abs(a - b)))
    assert not np.isnan(got.dynamics("loss", "presentation")[1:]).any()   # every example, every epoch


def _evaluation_matches_checkpoint(run, epoch):
    """The end-of-epoch numbers (evaluated split across the ranks) are exactly one process's
    evaluation of the saved weights and batch-norm statistics."""
    end = evaluate(run.model(epoch), run.data().train.batches(1024))
    for name in ("loss", "margin"):
        assert np.array_equal(run.dynamics(name, "end")[epoch], end[name][np.argsort(end["idx"])])


def test_split_bounds():
    assert split_bounds(37, 2) == [0, 19, 37]
    assert split_bounds(1, 2) == [0, 1, 1]
    assert split_bounds(8, 3) == [0, 3, 6, 8]


@pytest.mark.slow
def test_two_processes_train_the_one_process_run(reference, launched):
    got = _trained(launched, "two")
    assert launched["two"][1].out.count("2 epochs") == 1         # rank 0 alone reports
    assert got.config == reference.config
    _assert_close(got, reference)
    _evaluation_matches_checkpoint(got, 2)


@pytest.mark.slow
def test_resume_under_torchrun(reference, launched):
    _assert_close(_trained(launched, "cut"), reference)       # begun in one process (checked there), ended on 2


def test_batch_smaller_than_the_processes_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys.modules["memloc.training.train"], "world", lambda: (0, 2))   # as in a group of 2 processes
    with pytest.raises(SystemExit) as e:
        cli_run("train", [str(tmp_path / "r"), "--dataset", "digits", "--batch-size", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("memloc train: error: --batch-size 1 is smaller than the number of processes (2)")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_rank0_refusal_stops_every_rank(reference, launched):
    step = launched["refused"][1]                  # an existing run, no --resume / --overwrite
    assert None not in step.codes and 0 not in step.codes, step.err[-2000:]
    # rank 0 checked the directory; both ranks stop with its one-line error (none waits for the other)
    assert step.err.count("memloc train: error: run directory") == 2, step.err[-2000:]
    assert "already exists (--resume continues it" in step.err
    assert memloc.load(reference.path).final_epoch == 2


BN_FLAGS = ["--dataset", "digits", "--train-size", "300", "--model", "resnet9", "--width", "2", "--epochs", "1",
            "--batch-size", "64"]


@pytest.mark.slow
def test_batchnorm_on_cpu_processes_warns(launched):
    run, err = _trained(launched, "bn"), launched["bn"][1].err
    assert err.count("memloc train: warning: batch norm across 2 CPU processes") == 1    # rank 0 says it
    assert "Grad strides" not in err
    assert list(run.checkpoint(1)) == list(run.build_model().state_dict())     # BatchNorm keys, no wrapper
    _evaluation_matches_checkpoint(run, 1)        # rank 0's running statistics, everywhere


@needs_cuda(2)       # NCCL, SyncBatchNorm
def test_two_gpus_sync_batchnorm_equals_one(tmp_path):
    one = train(tmp_path / "one", {"dataset": "digits", "train_size": 300, "model": "resnet9", "width": 2,
                                   "epochs": 1, "batch_size": 64}, device="cuda")
    p = _torchrun(["train", str(tmp_path / "two"), *BN_FLAGS, "--device", "cuda"])
    assert p.returncode == 0, p.stderr[-3000:]
    two = memloc.load(tmp_path / "two")
    assert list(two.checkpoint(1)) == list(one.checkpoint(1))
    # statistics of the whole batch (SyncBatchNorm), so the run follows the one-process run
    assert np.nanmax(np.abs(one.dynamics("loss", "presentation")[1] - two.dynamics("loss", "presentation")[1])) < 1e-3
