"""Language-model runs under torchrun (2 gloo processes on the CPU), issue 23: the analyses that split
their work (memorisation, scores, gradients, rewind, retrain) give exactly the single-process result,
and ``memloc train`` of a language model trains one run with DDP that follows the one-process run
(the image path's checks, tests/test_ddp.py)."""
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.core.lm import TinyGPT, lm_logits
from memloc.scale.distributed import split_bounds
from memloc.training.lm import _batch_loss
from memloc.training.train import train
from conftest import results_free_copy, torchrun_steps, train_interrupted

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.xdist_group("lm_distributed")]     # one worker makes the module's torchrun

#: the conftest's memorising_lm, with 48 sequences (8 noisy, each with 4 copies) in batches of 7 that
#: split 4 / 3 across 2 processes (the last batch of 6: 3 / 3)
CFG = {"dataset": "tinymem:mult", "model": "gpt", "n_layer": 2, "d_model": 32, "n_head": 2, "n_train": 16,
       "n_test": 8, "seq_len": 16, "suffix_len": 4, "noise": 0.5, "duplicate": 4, "epochs": 10, "batch_size": 7,
       "lr": 2e-2, "weight_decay": 0.0}
FLAGS = ["--dataset", "tinymem:mult", "--model", "gpt", "--n-layer", "2", "--d-model", "32",
         "--n-head", "2", "--n-train", "16", "--n-test", "8", "--seq-len", "16", "--suffix-len", "4", "--noise", "0.5",
         "--duplicate", "4", "--epochs", "10", "--batch-size", "7", "--lr", "2e-2", "--weight-decay", "0",
         "--device", "cpu"]
#: measured: AdamW turns the order of floating-point sums into weights that differ by <= 1.7e-4 after the
#: first epoch (a near-zero gradient's rounding decides the sign of a whole step) and <= 1.3e-2 after ten
ATOL_EPOCH1, ATOL = 1e-3, 5e-2


def test_slices_of_a_batch_give_the_whole_batch_gradient():
    """The slices' losses, summed as DDP's average of their gradients (x 1/parts), are the batch's
    mean next-token loss, also for slices of unequal size and an empty one (up to float32 rounding: the
    loss is taken in float32; a wrong weighting of a slice is off by a tenth or more)."""
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=11, max_len=8, n_layer=1, n_head=2, d_model=8)
    x = torch.randint(0, 11, (5, 8))
    whole = _batch_loss(lm_logits(model, x[:, :-1]), x, 5, 1)
    want = torch.autograd.grad(whole, list(model.parameters()))
    for parts in (2, 3, 6):
        bounds = split_bounds(5, parts)
        total = sum(_batch_loss(lm_logits(model, x[a:b, :-1]), x[a:b], 5, parts) for a, b in zip(bounds, bounds[1:])
                    if b > a) / parts
        assert torch.allclose(total, whole, rtol=1e-6)
        got = torch.autograd.grad(total, list(model.parameters()))
        assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-7) for g, w in zip(got, want))


def test_batch_smaller_than_the_processes_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys.modules["memloc.training.lm"], "world", lambda: (0, 2))   # as in a group of 2
    with pytest.raises(SystemExit) as e:
        cli_run("train", [str(tmp_path / "r"), "--dataset", "tinymem:mult", "--batch-size", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("memloc train: error: --batch-size 1 is smaller than the number of processes (2)")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("lmddp") / "one", CFG, device="cpu")


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def launched(reference, one_thread, tmp_path_factory):
    """The module's torchrun, its steps in one process group: {name: (folder, step)} for "two" (`memloc train`
    of CFG), "cut" (CFG with SINKS begun in one process, killed after epoch 4, resumed by `memloc train --resume`)
    and "analyses" (WORKER on a copy of the reference)."""
    folder = tmp_path_factory.mktemp("lmddp_torchrun")
    cut, lm = folder / "cut", results_free_copy(reference, folder / "lm").path
    train_interrupted(cut, {**CFG, **SINKS}, epoch=4, device="cpu")
    (folder / "worker.py").write_text(WORKER)
    steps = {"two": (folder / "two", ["-m", "memloc", "train", folder / "two", *FLAGS]),
             "cut": (cut, ["-m", "memloc", "train", cut, *FLAGS, "--resume", "--etd-after", "mlp", "--p-gen", "0.5",
                           "--p-mem", "0.25"]),
             "analyses": (lm, [folder / "worker.py", lm, json.dumps(LOCALISATION)])}     # last: it wraps functions
    done = torchrun_steps(folder / "steps", {name: step for name, (_, step) in steps.items()},
                          env={"PYTHONWARNINGS": "ignore"}, cwd=ROOT)
    return {name: (path, done[name]) for name, (path, _) in steps.items()}


@pytest.mark.slow
def test_two_processes_train_the_one_process_run(reference, launched):
    out, step = launched["two"]
    assert step.ok().out.count("10 epochs") == 1            # rank 0 alone reports
    got = memloc.load(out)
    assert got.config == reference.config
    assert list(got.checkpoint(10)) == list(reference.checkpoint(10))      # the unwrapped module's keys
    _assert_follows(got, reference)         # weights close, the same memorised flags of every sequence
    metrics = reference.metrics()
    assert 0 < metrics["target_memorised"][-1] < 1          # part of the targets memorised: not trivial
    for when in ("presentation", "end"):                    # every sequence, every epoch
        loss = got.dynamics("suffix_loss", when)
        assert not np.isnan(loss[1:]).any()
        assert np.nanmax(np.abs(loss - reference.dynamics("suffix_loss", when))) < 0.05
    assert np.array_equal(got.metrics()["target_memorised"], metrics["target_memorised"])
    # the end-of-epoch measures (split across the ranks) are exactly one process's of the saved checkpoint
    data = got.data()
    for e in (0, 10):
        one = memloc.memorisation(got.model(e), data, eval_batch_size=256, device="cpu")
        for name in ("suffix_loss", "suffix_accuracy", "memorised"):
            assert np.array_equal(got.dynamics(name, "end")[e], one[name].values.astype(
                got.dynamics(name, "end").dtype)), (e, name)


def _assert_follows(got, reference):
    assert got.epochs == reference.epochs == list(range(11)) and _files(got.path) == _files(reference.path)
    for e in got.epochs:
        a, b = reference.checkpoint(e), got.checkpoint(e)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= (0 if e == 0 else ATOL_EPOCH1 if e == 1 else ATOL)
    for when in ("presentation", "end"):
        assert np.array_equal(got.dynamics("memorised", when), reference.dynamics("memorised", when)), when


#: memorisation sinks on both MLPs (MemSinks; --etd-after mlp), for the run resumed under torchrun
SINKS = {"etd_after": "mlp", "p_gen": 0.5, "p_mem": 0.25}


@pytest.mark.slow
def test_resume_with_sinks_under_torchrun(launched, tmp_path):
    """A run with sinks begun in one process and killed after epoch 4, resumed by 2 processes, follows the
    uninterrupted one-process run (measured: weights within 1e-2, the same memorised flags at presentation,
    each sequence through its own sinks, and at epoch ends): each rank binds the sink ids of its slice of
    every batch (the global sequence ids, a copy taking its original's); `memloc dropout` measures the same
    shares in every mode."""
    whole = train(tmp_path / "whole", {**CFG, **SINKS}, device="cpu")
    path, step = launched["cut"]
    step.ok()
    got = memloc.load(path)
    assert got.info["model"]["etd"] == whole.info["model"]["etd"]
    _assert_follows(got, whole)
    flags = whole.dynamics("memorised", "presentation")[5:][:, whole.is_noisy]
    assert 0 < flags.mean() < 1                    # targets reproduced through their own sinks, not all of them
    one, two = (memloc.evaluate_dropout(r, device="cpu")["accuracy"].values for r in (whole, got))
    assert np.array_equal(one, two, equal_nan=True)


#: the analyses in one torchrun: a script that joins the process group and calls the library
WORKER = textwrap.dedent("""
    import importlib, json, os, sys, torch
    torch.set_num_threads(1)
    import memloc
    from memloc.scale import ddp
    from memloc.scale.distributed import init_from_env, world
    init_from_env("cpu")
    run = memloc.load(sys.argv[1])
    measured, measure = [], ddp.sequence_measures
    ddp.sequence_measures = lambda model, tokens, *a, **k: measured.append(len(tokens)) or measure(model, tokens, *a, **k)
    mem = memloc.memorisation(run.model(), run.data(), eval_batch_size=4, device="cpu")
    ddp.sequence_measures = measure
    say = lambda line: os.write(1, (line + "\\n").encode())     # one write: the ranks' lines never interleave
    say(f"measured {sum(measured)}")
    if world()[0] == 0:
        mem.save(run.results_path("memorisation"))
    memloc.scores(run, methods="el2n,grand,tracin,forgetting", eval_batch_size=8, device="cpu", save=True)
    memloc.gradients(run, checkpoints="0,5,10", eval_batch_size=8, device="cpu", save=True)
    memloc.rewind(run, checkpoints="0,5", device="cpu", save=True)
    memloc.retrain(run, epochs=1, layers="blocks.0.mlp.up,blocks.0.mlp.down,head", device="cpu", save=True)
    localised = []      # the targets each rank localises (every target once, by one rank)
    modules = [importlib.import_module("memloc.analyses." + name) for name in ("localise", "deletion", "inj")]
    for module in modules:      # all imported first: each module's own name of the one function wrapped once
        module.neuron_scores = lambda m, tokens, *a, f=module.neuron_scores, **k: localised.append(len(tokens)) or f(
            m, tokens, *a, **k)
    for name, kw in json.loads(sys.argv[2]).items():
        getattr(memloc, name)(run, device="cpu", save=True, **kw)
    say(f"localised {sum(localised)}")
    say("done %d %d" % world())
""")
#: the per-target analyses (batches of 2 targets, cut short), by the methods that batch targets or draw random
#: numbers (zero_out and ig localise one target at a time): one process's arrays exactly
OPTIONS = {"slimming": {"max_steps": 10, "check_every": 5}, "hard_concrete": {"max_steps": 10, "check_every": 5},
           "greedy": {"max_zeroed": 4}}
LOCALISATION = {"localise_neurons": {"examples": "memorised:3"}, "del_benchmark": {"examples": "memorised:3",
                "fractions": [0.05]}, "inj_benchmark": {"n_sequences": 2, "n_injected": 2, "lr": 0.3, "max_steps": 100}}
for _kw in LOCALISATION.values():
    _kw.update(methods="activations,grad_x_act,greedy,slimming,hard_concrete,random", options=OPTIONS,
               eval_batch_size=2, ref_batch_size=2)
ANALYSES = {"scores": {"methods": "el2n,grand,tracin,forgetting", "eval_batch_size": 8},
            "gradients": {"checkpoints": "0,5,10", "eval_batch_size": 8},
            "rewind": {"checkpoints": "0,5"},
            "retrain": {"epochs": 1, "layers": "blocks.0.mlp.up,blocks.0.mlp.down,head"}}


def _assert_same(a, b):
    assert set(a.data_vars) == set(b.data_vars)
    for k in a.data_vars:
        x, y = a[k].values, b[k].values
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k


@pytest.mark.slow
def test_analyses_on_two_processes_equal_one(launched):
    path, step = launched["analyses"]
    run, stdout = memloc.load(path), step.ok().out
    assert sorted(line for line in stdout.split("\n") if line.startswith("done")) == ["done 0 2", "done 1 2"]
    localised = sum(int(line.split()[1]) for line in stdout.split("\n") if line.startswith("localised"))
    assert stdout.count(f"measured {len(run.data()) // 2}\n") == 2        # each rank measured half the sequences
    for name in ANALYSES:
        assert not run.results_path(name).with_name(f"{name}.partial").exists()   # parts gone once saved
    got = {name: run.result(name) for name in ("memorisation", *ANALYSES)}
    want = memloc.memorisation(run.model(), run.data(), eval_batch_size=4, device="cpu")
    assert want["memorised"].values.any() and (~want["memorised"].values).any()     # not trivial
    _assert_same(want, got["memorisation"])
    for name, kw in ANALYSES.items():
        _assert_same(getattr(memloc, name)(run, device="cpu", **kw), got[name])
    results = {"localise_neurons": "localise_neurons", "del_benchmark": "del", "inj_benchmark": "inj"}
    for name, kw in LOCALISATION.items():     # random baselines and Hard Concrete's noise included
        want = getattr(memloc, name)(run, device="cpu", **kw)
        assert not run.results_path(results[name]).with_name(f"{results[name]}.partial").exists()
        got = run.result(results[name])
        assert want["method"].values.tolist() == got["method"].values.tolist() == _kw["methods"].split(",")
        assert "kind" not in want or want["kind"].values.tolist() == got["kind"].values.tolist()
        timings = [k for k in ("seconds", "inject_seconds", "kind") if k in want]
        _assert_same(want.dataset.drop_vars(timings), got.dataset.drop_vars(timings))
    assert localised == 3 + 3 + int(want["injected_ok"].sum())     # each target localised once, by one rank
