"""Analyses split across processes (torchrun, gloo on CPU) give exactly the single-process result;
a killed run's finished parts are kept and the rest is redone."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import memloc
from memloc.cli import run as cli_run
from memloc.training.train import train
from conftest import results_free_copy, torchrun_steps

pytestmark = pytest.mark.xdist_group("distributed")     # one worker makes the module's torchrun

TINY = {"dataset": "digits", "model": "mlp", "epochs": 20, "batch_size": 64, "lr": 0.1, "noise": 0.2}
FLIP = ["--examples", "noisy:12,clean:12", "--dtype", "float64", "--collateral", "--repeats", "2",
        "--max-units", "40", "--device", "cpu"]
MANY = ["--examples", "any:40", "--dtype", "float64", "--repeats", "2", "--max-units", "40", "--group-size", "1",
        "--device", "cpu"]        # 80 searches (~0.05 CPU-s each), each saved as a part of its own: time to kill the run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("dist") / "tiny", TINY, device="cpu")


def _torchrun(args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "memloc", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _descendants(pid):
    """Process ids below ``pid`` (Linux /proc), deepest first."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            out = [*_descendants(c), c, *out]
    return out


def _arrays(res):
    return {k: res[k].values for k in ("n_units", "flipped", "neuron_count", "unit_ids", "unit_offsets",
                                       "layer_hist", "collateral", "status", "reference")}


def _assert_same(a, b):
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def _single(run, extra=(), args=FLIP):
    out = run.results_path("flip")
    out.unlink(missing_ok=True)
    cli_run("flip", [str(run.path), *args, *extra])
    res = _arrays(run.result("flip"))
    out.unlink()
    return res


@pytest.fixture(scope="module")
def launched(run, tmp_path_factory):
    """The module's torchrun (its two steps in one process group): {"passes": (parts folder, step) of PASSES,
    "flip": (a copy of ``run``, step) of `memloc flip` with FLIP}."""
    folder = tmp_path_factory.mktemp("dist_torchrun")
    copy = results_free_copy(run, folder / "run")
    (folder / "passes.py").write_text(PASSES)
    steps = {"passes": (folder / "x.partial", [folder / "passes.py", folder / "x.partial"]),
             "flip": (copy, ["-m", "memloc", "flip", copy.path, *FLIP])}
    done = torchrun_steps(folder / "steps", {name: step for name, (_, step) in steps.items()},
                          env={"PYTHONWARNINGS": "ignore"})
    return {name: (what, done[name]) for name, (what, _) in steps.items()}


@pytest.mark.slow
def test_flip_on_two_processes_equals_one(run, launched):
    want = _single(run)
    copy, step = launched["flip"]
    assert step.ok().out.count("wrote ") == 1          # rank 0 alone saves and reports
    got = _arrays(memloc.load(copy.path).result("flip"))
    _assert_same(want, got)
    assert not copy.results_path("flip").with_name("flip.partial").exists()     # parts gone once saved


@pytest.mark.slow
def test_killed_processes_resume_from_their_parts(run, capsys):
    want = _single(run, [], args=MANY)
    parts = run.results_path("flip").with_name("flip.partial")
    p = _torchrun(["flip", str(run.path), *MANY])
    deadline = time.time() + 240
    try:
        while time.time() < deadline and p.poll() is None:
            names = [q.name for q in parts.glob("part_*.h5")] if parts.exists() else []
            if any("_r0" in n for n in names) and any("_r1" in n for n in names):
                break
            time.sleep(0.01)
    finally:
        for pid in [*_descendants(p.pid), p.pid]:      # the workers, then torchrun: no rank writes on
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.communicate()
    assert not run.results_path("flip").exists(), "the search finished before it could be killed"
    saved = len(list(parts.glob("part_*.h5")))
    assert saved >= 2
    cli_run("flip", [str(run.path), *MANY])       # rerun (here in one process)
    assert "resuming" in capsys.readouterr().err
    _assert_same(want, _arrays(memloc.load(run.path).result("flip")))
    run.results_path("flip").unlink()


def test_commands_that_do_not_split_refuse_torchrun(run, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli_run("importance", [str(run.path), "--device", "cpu"])
    assert e.value.code == 2 and "does not split its work" in capsys.readouterr().err


def test_refusal_under_torchrun_is_said_once_by_rank_0(run, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        cli_run("importance", [str(run.path), "--device", "cpu"])
    assert e.value.code == 2 and capsys.readouterr().err == ""


PASSES = '''
import sys, time
import numpy as np
from memloc.scale import parts as P
from memloc.scale.distributed import init_from_env, world
init_from_env("cpu")
rank, folder = world()[0], sys.argv[1]
first = P.Parts(folder, {"pass": 1}, what="first pass")
first.add({(rank,): np.full(3, float(rank))})
read = P.Format.read
P.Format.read = lambda self, path: (time.sleep(1.0) if rank == 1 else None) or read(self, path)   # rank 1 reads slowly
first.gather()
P.Format.read = read
got = sorted(first.done)
first.release()
P.Parts(folder, {"pass": 2}, what="second pass", overwrite=True).release()   # rank 0 clears the folder
print(rank, got, flush=True)
'''


@pytest.mark.slow
def test_a_pass_reads_every_part_before_the_next_pass_clears_the_folder(launched):
    """Two passes over one parts folder (as scores' passes share ``scores.partial``): rank 0 may clear it for
    the next pass only once every rank has read the last pass's parts (once a race: rank 1 lost its files)."""
    step = launched["passes"][1]
    assert sorted(step.ok().out.split("\n")[:2]) == ["0 [(0,), (1,)]", "1 [(0,), (1,)]"]
