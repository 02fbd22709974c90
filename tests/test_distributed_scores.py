"""scores (el2n, grand, tracin and the rest), gradients and a retraining grid (prune) split across
processes (torchrun, gloo on CPU) give exactly the single-process result (float64 arrays); a run
interrupted after some parts were saved is finished by the next run without redoing them."""
import importlib
import shutil

import numpy as np
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.core.evaluate import evaluate
from memloc.training.train import train
from conftest import results_free_copy, torchrun_steps
from test_distributed_layers import _interrupt_after_first_part

pytestmark = pytest.mark.xdist_group("distributed_scores")     # one worker makes the module's torchrun

S = importlib.import_module("memloc.analyses.scores")     # the package (memloc.scores is the function)

TINY = {"dataset": "digits", "model": "mlp", "epochs": 4, "batch_size": 64, "lr": 0.1, "noise": 0.2}
ARGS = {"scores": ["--batch-size", "64", "--device", "cpu"],        # every score (no flip: no neuron_count)
        "gradients": ["--batch-size", "256", "--device", "cpu"]}
PRUNE = ["--by", "el2n", "--keep", "0.5", "--seeds", "0", "--device", "cpu"]   # 2 fresh runs: 1 per rank


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("dist_scores") / "tiny", TINY, device="cpu")


CLEAN = ["--by", "el2n", "--seeds", "1", "--no-cleanlab", "--device", "cpu"]    # 2 fresh runs: 1 per rank
LAUNCHED = {"scores": ARGS["scores"], "gradients": ARGS["gradients"], "prune": PRUNE, "clean": CLEAN}


@pytest.fixture(scope="module")
def launched(run, tmp_path_factory):
    """Each command of LAUNCHED on 2 processes, all in one torchrun, each on a copy of ``run`` of its own:
    {name: (the copy, its torchrun step)}; each test compares one with the single-process result on that copy."""
    folder = tmp_path_factory.mktemp("dist_scores_torchrun")
    copies = {name: results_free_copy(run, folder / name) for name in LAUNCHED}
    steps = torchrun_steps(folder / "steps", {name: ["-m", "memloc", name, copies[name].path, *args]
                                              for name, args in LAUNCHED.items()}, env={"PYTHONWARNINGS": "ignore"})
    return {name: (copies[name], steps[name]) for name in LAUNCHED}


@pytest.fixture(autouse=True)
def one_thread():
    """The reference in this process computes with the workers' one thread (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _arrays(res):
    return {k: res[k].values for k in res.data_vars}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def _single(name, run, args):
    out = run.results_path(name)
    out.unlink(missing_ok=True)
    res = cli_run(name, [str(run.path), *args])
    out.unlink()
    return res


def _distributed(name, launched):
    """The result of ``name`` on 2 processes (the module's torchrun), checked, and its copy of the run."""
    run, step = launched[name]
    assert step.ok().out.count("wrote ") == 1             # rank 0 alone saves and reports
    res = memloc.load(run.path).result(name)
    assert not run.results_path(name).with_name(f"{name}.partial").exists()     # parts gone once saved
    run.results_path(name).unlink()
    return res, run


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scores", "gradients"])
def test_two_processes_equal_one(name, launched):
    got, run = _distributed(name, launched)
    want = _single(name, run, ARGS[name])
    if name == "scores":
        assert {"el2n", "grand", "tracin", "forgetting"} <= set(want.data_vars)
        assert all(want[k].dtype == np.float64 for k in want.data_vars)
    _assert_same(_arrays(want), _arrays(got))
    assert got.config == {**want.config}


def test_cells_equal_the_whole_set_functions(run):
    """The cell-split passes give what one pass over the whole training set gives."""
    res = memloc.scores(run, methods="el2n,grand,tracin", eval_batch_size=64, device="cpu")
    k = res.config["checkpoint_k"]
    model, train_set = run.model(k), run.data("cpu").train
    assert np.array_equal(res["grand"].values, S.grad_norms(model, train_set.x, train_set.y, batch_size=64))
    logits = evaluate(model, train_set.batches(64), logits=True)["logits"]
    assert np.array_equal(res["el2n"].values, S.el2n(logits, run.label_given))
    epochs = res.config["tracin_epochs"]
    want = S.tracin_self_influence((run.model(e) for e in epochs), res.config["tracin_weights"], train_set.x,
                                   train_set.y, batch_size=64)
    assert np.array_equal(res["tracin"].values, want)


@pytest.mark.parametrize("name", ["scores", "gradients"])
def test_a_rank_part_is_kept_and_the_rest_finished_in_one_process(name, run, monkeypatch):
    kw = {"scores": {"methods": "grand,tracin", "eval_batch_size": 64}, "gradients": {"checkpoints": "0,2,4"}}[name]
    argv = {"scores": ["--scores", "grand,tracin", "--batch-size", "64"], "gradients": ["--checkpoints", "0,2,4"]}[name]
    want = _arrays(getattr(memloc, name)(run, device="cpu", **kw))
    parts = run.results_path(name).with_name(f"{name}.partial")
    _interrupt_after_first_part(getattr(memloc, name), run, monkeypatch, **kw)
    (first,) = parts.glob("part_*.npz")
    first.rename(first.with_name(first.stem + "_r1.npz"))     # as rank 1 of a killed torchrun leaves it
    with np.load(parts / f"{first.stem}_r1.npz") as f:
        saved = {tuple(k) for k in f["keys"].tolist()}

    computed = []
    if name == "scores":
        cell = S._Inputs.cell

        def counted(self, kind, model, examples):
            computed.append(kind)
            return cell(self, kind, model, examples)
        monkeypatch.setattr(S._Inputs, "cell", counted)
    else:
        G = importlib.import_module("memloc.analyses.gradients")
        layer_gradients = G.layer_gradients

        def counted(*a, **k):
            computed.append(1)
            return layer_gradients(*a, **k)
        monkeypatch.setattr(G, "layer_gradients", counted)
    got = cli_run(name, [str(run.path), *argv, "--device", "cpu"])
    total = 3 if name == "gradients" else len(set(got.config["tracin_epochs"]) | {got.config["checkpoint_k"]}) * \
        -(-len(run.label_given) // S.passes.block_rows(len(run.label_given), 64))
    assert len(saved) == 1 and len(computed) == total - 1        # the saved part was not redone
    _assert_same(want, _arrays(got))
    assert not parts.exists()
    run.results_path(name).unlink()


def _child_runs(run) -> list:
    """The child run folders (not the hidden lock files they are trained under)."""
    return sorted(p for p in (run.path / "children").iterdir() if p.is_dir())


@pytest.mark.slow
def test_prune_grid_on_two_processes_equals_one(launched):
    """The fresh runs of a grid are split across the ranks (each a one-process training); rank 0
    evaluates. Retrained in one process afterwards, the result is the same."""
    got, run = _distributed("prune", launched)
    children = _child_runs(run)
    assert len(children) == 2                    # el2n and random (all-s0 is the parent itself)
    for c in children:
        assert memloc.load(c).final_epoch == TINY["epochs"]
    shutil.rmtree(run.path / "children")
    want = _single("prune", run, PRUNE)
    assert _child_runs(run) == children
    _assert_same(_arrays(want), _arrays(got))


def test_commands_that_split_their_work():
    from memloc.core import registry
    sharded = {n for n in registry.commands() if registry.command(n).sharded}
    assert {"scores", "gradients", "prune", "clean", "jtt"} <= sharded


@pytest.mark.slow
def test_clean_grid_on_two_processes_equals_one_and_loses_nothing(launched):
    """clean under torchrun (issue 25): its fresh runs split across 2 gloo ranks are the runs one process
    trains (same folders, same weights), its accuracies and flags the same, and nothing is left half done."""
    got, run = _distributed("clean", launched)
    children = _child_runs(run)
    assert [c.name.rsplit("-", 1)[0] for c in children] == ["all-s1", "clean-memloc-drop-s1"]
    weights = {}
    for c in children:
        child = memloc.load(c)
        assert child.final_epoch == TINY["epochs"]                   # every epoch of every child, none lost
        weights[c.name] = child.checkpoint(child.final_epoch)
    leftovers = [p for p in run.path.rglob("*") if p.suffix in (".partial", ".tmp") or ".tmp" in p.name]
    assert not leftovers, leftovers             # no part files nor half-written ones (the children's locks stay)
    assert list(got["seed"].values) == [1] and list(got["flags"].values) == ["all", "memloc"]
    shutil.rmtree(run.path / "children")
    want = _single("clean", run, CLEAN)
    assert _child_runs(run) == children
    for c in children:
        child = memloc.load(c)
        for k, t in child.checkpoint(child.final_epoch).items():
            assert torch.equal(t, weights[c.name][k]), (c.name, k)
    _assert_same(_arrays(want), _arrays(got))
    assert got.config == want.config
