"""memloc.flip: the batched search against a plain one-example-at-a-time implementation, resumability,
no leaking hooks / no weight edits, bad input, and the paper's finding on the MNIST-5k MLP run.

``reference_flip`` below is the slow reference; ``scripts/bench_flip.py`` loads it from this file.
"""
import copy
import importlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.evaluate import SUBSETS, accuracies
from memloc.analyses.flip.store import read_parts
from memloc.training.train import train
from memloc.core.units import trace, unit_masks

flip = importlib.import_module("memloc.analyses.flip")      # the module (``memloc.flip`` is the function)
store = importlib.import_module("memloc.analyses.flip.store")


@pytest.fixture(autouse=True)
def _leave_shared_runs_clean(request):
    """The run fixtures are shared with other test files: remove our results after each test."""
    yield
    for name in ("mlp_run", "lenet_run", "tiny_run"):
        if name in request.fixturenames:
            out = request.getfixturevalue(name).results_path("flip")
            out.unlink(missing_ok=True)
            if out.with_name("flip.partial").exists():
                shutil.rmtree(out.with_name("flip.partial"))


# ----------------------------------------------------------------------------- the reference
def reference_flip(model, structure, x, y, target_id, ref_x, ref_y, ref_ids, repeat, *, site="pre_norm",
                   max_units=100, noise_samples=0, noise_ratio=0.01, seed=0, dtype=torch.float64):
    """One search, one example at a time, written plainly from the definition in memloc.flip.

    ``x`` one input (...), ``y`` its label (int), ``ref_x`` (B, ...), ``ref_y``/``ref_ids`` (B,).
    Returns (zeroed unit ids, flipped).
    """
    model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    mask = torch.ones(structure.n_units, dtype=dtype)
    keep = torch.as_tensor(np.asarray(ref_ids)) != target_id
    units = []
    while True:
        xt = flip.noisy_copies(x.to(dtype), noise_samples, noise_ratio,
                               flip.noise_seed(seed, target_id, repeat, len(units)))
        m = mask.clone().requires_grad_(True)
        with unit_masks(model, structure, m, site=site):
            logits = model(torch.cat([xt, ref_x.to(dtype)]))
        target = logits[:len(xt)].mean(0)
        if int(target.argmax()) != int(y):
            return units, True
        if len(units) == min(max_units, structure.n_units):
            return units, False
        ref_loss = F.cross_entropy(logits[len(xt):][keep], ref_y[keep])
        objective = ref_loss - F.cross_entropy(target[None], torch.tensor([int(y)]))
        grad, = torch.autograd.grad(objective, m)
        score = (grad * mask).masked_fill(mask == 0, float("-inf"))
        j = int(score.argmax())
        units.append(j)
        mask[j] = 0


def _inputs(data, ids, refs):
    r = torch.as_tensor(refs)
    return data.train.x[ids], data.train.y[ids], data.train.x[r], data.train.y[r]


def _assert_equal_to_reference(model, x, y, ids, rx, ry, refs, *, group_size, site="pre_norm", **kw):
    search = flip.FlipSearch(model, rx, ry, refs, site=site, dtype=torch.float64)
    tasks = [(k, r) for k in range(len(ids)) for r in range(len(refs))]
    got = {(t.k, t.repeat): (t.units.tolist(), t.flipped)
           for t in search.run(x, y, ids, tasks, group_size=group_size, **kw)}
    assert sorted(got) == tasks
    assert all(len(set(u)) == len(u) for u, _ in got.values())       # a zeroed unit is never picked again
    for k, r in tasks:
        want = reference_flip(model, search.structure, x[k], y[k], int(ids[k]), rx[r], ry[r], refs[r], r, site=site, **kw)
        assert got[(k, r)] == (want[0], want[1]), f"example {ids[k]} repeat {r}"
    return got, search


# ----------------------------------------------------------------------------- equality
def test_batched_equals_reference_mlp(mlp_run):
    data, model = mlp_run.data(), mlp_run.model()
    ids = flip.select_examples("noisy:3,clean:3", mlp_run.is_noisy, seed=1)
    refs = flip.reference_batches(np.flatnonzero(~mlp_run.is_noisy), 24, 2, seed=1)
    refs[1, 0] = ids[-1]      # a target inside its own reference batch is left out of the mean
    x, y, rx, ry = _inputs(data, ids, refs)
    got, _ = _assert_equal_to_reference(model, x, y, ids, rx, ry, refs, group_size=4, max_units=30)
    assert any(f for _, f in got.values()) and max(len(u) for u, _ in got.values()) > 3
    # Gaussian-noise averaging: the same per-step draws in both implementations
    _assert_equal_to_reference(model, x[2:4], y[2:4], ids[2:4], rx[:1], ry[:1], refs[:1], group_size=1,
                               max_units=20, noise_samples=3, noise_ratio=0.05, seed=3)


def test_batched_equals_reference_lenet(lenet_run):     # ~7 CPU-s with its fixture: not slow
    data, model = lenet_run.data(), lenet_run.model()
    with torch.no_grad():
        fitted = model(data.train.x).argmax(1).numpy() == data.train.y.numpy()
    memorised = np.flatnonzero(lenet_run.is_noisy & fitted)      # noisy labels the model fits: searched, not flipped at once
    ids = np.concatenate([memorised[:3], flip.select_examples("clean:3", lenet_run.is_noisy, seed=2)])
    refs = flip.reference_batches(np.flatnonzero(~lenet_run.is_noisy), 16, 1, seed=2)
    x, y, rx, ry = _inputs(data, ids, refs)
    got, search = _assert_equal_to_reference(model, x, y, ids, rx, ry, refs, group_size=4, max_units=20)
    assert search.prefix is not None      # the cached first conv was used (and agreed)
    assert search.stats["reference_evaluations"] < search.stats["example_steps"]   # memoised masks were reused
    assert len(memorised) >= 3 and all(len(u) >= 1 and f for u, f in got.values())   # every search zeroed units
    assert len({len(u) for u, _ in got.values()}) > 1 and max(len(u) for u, _ in got.values()) >= 4


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(48, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 5))
    x = torch.randn(60, 1, 8, 8)
    for m in model.modules():   # non-trivial running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()
        model(x * 2 + 0.5)
    return model.eval(), x


@pytest.mark.parametrize("site", ["pre_norm", "post_norm"])
def test_batched_equals_reference_batchnorm_eval(site):
    model, x = _bn_model()
    with torch.no_grad():
        y = model(x).argmax(1)
    ids = torch.arange(60).numpy()
    refs = np.stack([np.arange(20, 40), np.arange(40, 60)])
    r = torch.as_tensor(refs)
    got, search = _assert_equal_to_reference(model, x[:6], y[:6], ids[:6], x[r], y[r], refs, group_size=4,
                                             site=site, max_units=15)
    assert search.prefix is not None and any(f for _, f in got.values())
    # the plain computation (no cached prefix) gives the same sequences
    plain = flip.FlipSearch(model, x[r], y[r], refs, site=site, dtype=torch.float64, cache_prefix=False)
    again = {(t.k, t.repeat): (t.units.tolist(), t.flipped)
             for t in plain.run(x[:6], y[:6], ids[:6], list(got), group_size=5, max_units=15)}
    assert again == got


class _ReusesInput(nn.Module):
    """The input reaches the head twice: caching the first layer's output must switch itself off."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(10, 16), nn.Linear(26, 3)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.fc1(x)), x], 1))


def test_prefix_cache_switches_off_for_models_reusing_the_input():
    torch.manual_seed(1)
    model = _ReusesInput().eval()
    x = torch.randn(30, 10)
    y = model(x).argmax(1).detach()
    refs = np.arange(10, 30)[None]
    r = torch.as_tensor(refs)
    _, search = _assert_equal_to_reference(model, x[:5], y[:5], np.arange(5), x[r], y[r], refs,
                                           group_size=2, max_units=10)
    assert search.prefix is None


# ----------------------------------------------------------------------------- no side effects
def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks]


def test_no_hook_leaks_and_no_weight_edits(mlp_run):
    data, model = mlp_run.data(), mlp_run.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    ids = flip.select_examples("noisy:3,clean:3", mlp_run.is_noisy, seed=0)
    refs = flip.reference_batches(np.flatnonzero(~mlp_run.is_noisy), 16, 1)
    x, y, rx, ry = _inputs(data, ids, refs)
    search = flip.FlipSearch(model, rx, ry, refs)
    traces = list(search.run(x, y, ids, [(k, 0) for k in range(6)], group_size=4, max_units=30))
    assert len(traces) == 6 and _hooks(search.model) == [] and _hooks(model) == []
    # searches failing inside a forward pass (hooks registered) leave no hook behind: in the check
    # of the targets' predictions, and in the forward/backward with the reference batch (17 rows)
    for rows in (0, 10):
        search = flip.FlipSearch(model, rx, ry, refs)
        fc2 = search.model.fc2.forward
        search.model.fc2.forward = lambda inp: fc2(inp) if len(inp) <= rows else 1 / 0
        with pytest.raises(ZeroDivisionError):
            list(search.run(x, y, ids, [(3, 0)], max_units=5))
        assert _hooks(search.model) == [] and _hooks(model) == []
    # the user's model: same weights, dtype, mode and requires_grad flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert not model.training and flags == [p.requires_grad for p in model.parameters()]


# ----------------------------------------------------------------------------- example selection
def test_select_examples_grammar():
    noisy = np.zeros(50, bool)
    noisy[[3, 7, 11, 20, 31]] = True
    a = flip.select_examples("noisy:3,clean:4", noisy, seed=5)
    assert len(a) == 7 and noisy[a[:3]].all() and not noisy[a[3:]].any()
    assert np.array_equal(a, flip.select_examples("noisy:3,clean:4", noisy, seed=5))
    assert not np.array_equal(a, flip.select_examples("noisy:3,clean:4", noisy, seed=6))
    assert flip.select_examples("ids:1,5,9", noisy).tolist() == [1, 5, 9]
    assert flip.select_examples("10-12,3,11", noisy).tolist() == [10, 11, 12, 3]
    assert sorted(flip.select_examples("noisy:all", noisy).tolist()) == [3, 7, 11, 20, 31]
    b = flip.select_examples("3,7,noisy:3", noisy)           # sampling skips ids already chosen
    assert b[:2].tolist() == [3, 7] and len(set(b.tolist())) == 5 and noisy[b].all()
    for spec, msg in [("50", "0..49"), ("ids:-1", "neither"), ("noisy:6", "only 5 noisy"),
                      ("bogus:3", "unknown pool"), ("noisy:x", "COUNT"), ("", "empty"), ("4-2", "empty")]:
        with pytest.raises(MemlocError, match=msg):
            flip.select_examples(spec, noisy)
    with pytest.raises(MemlocError, match="no noisy"):
        flip.select_examples("noisy:2", np.zeros(50, bool))


# ----------------------------------------------------------------------------- the results file
def _read(run):
    """The saved flip result of ``run`` (RUN/results/flip.h5)."""
    return run.result("flip")


def test_file_schema_and_collateral(tiny_run, capsys):
    """tiny_run has not memorised its noisy labels: those are recorded with status 1, not searched."""
    cli_run("flip", [str(tiny_run.path), "--examples", "noisy:6,clean:5", "--repeats", "2", "--collateral",
                     "--max-units", "40", "--ref-batch-size", "32", "--group-size", "3"])
    err = capsys.readouterr().err
    res = _read(tiny_run)
    cfg = res.config
    k = res.sizes["example"]
    assert k == 11 and cfg["max_units"] == 40 and cfg["repeats"] == 2 and cfg["checkpoint"] == tiny_run.final_epoch
    status, n, fl = res["status"].values, res["n_units"].values, res["flipped"].values
    assert status.dtype == np.int8 and n.shape == fl.shape == (k, 2) and res["n_units"].dims == ("example", "repeat")
    assert (status == 1).any() and f"{int((status == 1).sum())} of 11 examples are misclassified" in err
    assert (n[status == 1] == 0).all() and not fl[status == 1].any() and (status[~res["is_noisy"].values] == 0).any()
    off = res["unit_offsets"].values
    assert off.shape == (k * 2 + 1,) and np.array_equal(np.diff(off), n.reshape(-1))
    hist = res["layer_hist"].values
    assert hist.shape == (k, 2, 2) and np.array_equal(hist.sum(2), n)
    assert res["layer"].values.tolist() == ["fc1", "fc2"]
    assert res["layer_offset"].values.tolist() == [0, res["layer_size"].values[0]]
    col = res["collateral"].values
    assert col.shape == (k, 2, 4) and res["collateral"].dims == ("example", "repeat", "subset")
    assert np.isnan(col[status == 1]).all() and np.isfinite(col[status == 0]).all()
    assert res["subset"].values.tolist() == list(SUBSETS)
    # the collateral accuracies are those of the model with that search's units zeroed
    row = int(np.flatnonzero(status == 0)[0]) * 2 + 1
    model, data = tiny_run.model(), tiny_run.data()
    structure = trace(model, data.train.x[:1])
    mask = torch.ones(structure.n_units)
    mask[torch.as_tensor(res["unit_ids"].values[off[row]:off[row + 1]])] = 0
    with unit_masks(model, structure, mask):
        acc = accuracies(model, data)
    assert np.allclose(col.reshape(-1, 4)[row], [acc[s] for s in SUBSETS])
    for r in (0, 1):     # every searched row either flipped or hit the cap
        assert ((fl[:, r] & (n[:, r] <= 40)) | (~fl[:, r] & ((n[:, r] == 40) | (status == 1)))).all()


def test_resume_after_interruption_matches_uninterrupted(tiny_run, monkeypatch):
    args = [str(tiny_run.path), "--examples", "clean:7", "--max-units", "30", "--repeats", "2",
            "--group-size", "3", "--ref-batch-size", "16", "--dtype", "float64", "--seed", "4"]
    out = tiny_run.results_path("flip")
    cli_run("flip", args + ["--overwrite"])
    want = _read(tiny_run)
    assert want.config["dtype"] == "float64"
    out.unlink()

    write, calls = store.write_part, []

    def dies_after_first(*a, **kw):
        if calls:
            raise RuntimeError("killed")
        calls.append(1)
        return write(*a, **kw)

    monkeypatch.setattr(store, "write_part", dies_after_first)
    with pytest.raises(RuntimeError, match="killed"):
        cli_run("flip", args + ["--group-size", "2"])      # the group size may change between sessions
    partial = out.with_name("flip.partial")
    assert not out.exists() and len(list(partial.glob("part_*.h5"))) == 1
    monkeypatch.setattr(store, "write_part", write)

    searched = []
    run_searches = flip.FlipSearch.run

    def spy(self, x, y, ids, tasks, **kw):
        tasks = list(tasks)
        searched.extend(tasks)
        return run_searches(self, x, y, ids, tasks, **kw)

    monkeypatch.setattr(flip.FlipSearch, "run", spy)
    cli_run("flip", args)
    assert len(searched) == 2 * (want["status"].values == 0).sum() - 2 > 0   # the 2 saved are not redone
    got = _read(tiny_run)
    assert not partial.exists() and set(got.variables) == set(want.variables)
    for name in want.variables:
        a, b = got[name].values, want[name].values
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


def test_rerun_and_settings_conflicts(tiny_run, capsys):
    args = [str(tiny_run.path), "--examples", "ids:0,1", "--max-units", "5", "--ref-batch-size", "8"]
    cli_run("flip", args + ["--overwrite"])
    cli_run("flip", args)
    assert "already complete" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_run("flip", args[:-1] + ["9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "--overwrite" in err and "Traceback" not in err
    # an interrupted search with other settings is not silently mixed in
    partial = tiny_run.results_path("flip").with_name("flip.partial")
    partial.mkdir()
    (partial / "settings.json").write_text(json.dumps({"seed": 99}))
    tiny_run.results_path("flip").unlink()
    with pytest.raises(SystemExit):
        cli_run("flip", args)
    assert "interrupted search with different settings" in capsys.readouterr().err
    cli_run("flip", args + ["--overwrite"])
    assert not partial.exists() and tiny_run.results_path("flip").exists()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "clean", {"dataset": "digits", "epochs": 1, "noise": 0.0,
                                                            "batch_size": 64}, device="cpu")


@pytest.mark.parametrize("extra, msg", [
    (["--examples", "noisy:5"], "has no noisy"),
    (["--examples", "ids:3,100000"], "example ids must be in 0.."),
    (["--ref-batch-size", "100000"], "--ref-batch-size must be in"),
    (["--checkpoint", "99"], "no checkpoint for epoch 99"),
    (["--max-units", "0"], "--max-units: expected an integer >= 1"),   # range-checked by argparse now
])
def test_bad_input_is_a_clear_error(clean_run, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        cli_run("flip", [str(clean_run.path), "--examples", "clean:2", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err
    assert not clean_run.results_path("flip").exists() and not clean_run.results_path("flip").with_name("flip.partial").exists()


# ----------------------------------------------------------------------------- the science
def test_noisy_examples_flip_with_fewer_units(mlp_run):
    """Maini et al.: memorised (mislabeled) examples need fewer zeroed units to flip than clean ones."""
    from sklearn.metrics import roc_auc_score
    cli_run("flip", [str(mlp_run.path), "--examples", "noisy:50,clean:50", "--max-units", "100", "--overwrite"])
    res = _read(mlp_run)
    ok = res["status"].values == 0
    score = np.where(res["flipped"].values, res["n_units"].values, 101).mean(1)[ok]
    noisy = res["is_noisy"].values[ok]
    assert ok.sum() >= 95
    assert np.median(score[noisy]) < np.median(score[~noisy])
    assert roc_auc_score(noisy, -score) > 0.8      # 0.94 over 100 + 100 examples


def test_ctrl_c_saves_finished_searches(tiny_run, monkeypatch, capsys):
    run_searches = flip.FlipSearch.run

    def interrupted(self, *a, **kw):
        for i, t in enumerate(run_searches(self, *a, **kw)):
            if i == 3:
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(flip.FlipSearch, "run", interrupted)
    with pytest.raises(SystemExit) as e:
        cli_run("flip", [str(tiny_run.path), "--examples", "clean:8", "--max-units", "10", "--group-size", "50"])
    assert e.value.code == 130 and "rerun to continue" in capsys.readouterr().err
    partial = tiny_run.results_path("flip").with_name("flip.partial")
    assert len(read_parts(partial)) == 3
