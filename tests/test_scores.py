"""memloc.scores: known answers on hand-built dynamics, GraNd equal to a per-example backward loop
(MLP, conv + batch-norm models, modules without a norm rule), the flip result -> neuron count, the CLI.

``write_flip_h5`` (a flip result per the schema, built by hand) is also used by test_detect.py.
"""
import copy
import importlib
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from memloc.cli import run as cli_run
from memloc.core.evaluate import SUBSETS
from memloc.core.models import build_model
from memloc.core.results import Result
from memloc.core.run import load

scores = importlib.import_module("memloc.analyses.scores")      # the package (``memloc.scores`` is the function)


def write_flip_h5(run, index, status, n_units, flipped, *, max_units, is_noisy=None):
    """Save a results/flip.h5 "flip" result with the given per-example values (units/layers left empty)."""
    index = np.asarray(index, dtype=np.int64)
    n_units, flipped = np.asarray(n_units, dtype=np.int32), np.asarray(flipped, dtype=bool)
    status = np.asarray(status, dtype=np.int8)
    k, repeats = n_units.shape
    count = np.where(status == 0, np.where(flipped, n_units, max_units + 1).mean(1), np.nan)
    ds = xr.Dataset(
        {"is_noisy": ("example", run.is_noisy[index] if is_noisy is None else np.asarray(is_noisy, dtype=bool)),
         "label": ("example", run.label_given[index].astype(np.int64)),
         "status": ("example", status), "neuron_count": ("example", count),
         "n_units": (("example", "repeat"), n_units), "flipped": (("example", "repeat"), flipped),
         "layer_hist": (("example", "repeat", "layer"), np.zeros((k, repeats, 0), np.int32)),
         "collateral": (("example", "repeat", "subset"), np.full((k, repeats, len(SUBSETS)), np.nan)),
         "unit_ids": ("zeroed", np.zeros(0, np.int64)), "unit_offsets": ("row", np.zeros(n_units.size + 1, np.int64)),
         "layer_size": ("layer", np.zeros(0, np.int64)), "layer_offset": ("layer", np.zeros(0, np.int64)),
         "reference": (("repeat", "ref"), np.zeros((repeats, 0), np.int64))},
        coords={"example": index, "repeat": np.arange(repeats), "layer": np.zeros(0, dtype=str),
                "subset": list(SUBSETS)})
    res = Result("flip", ds, config={"checkpoint": run.final_epoch, "site": "pre_norm", "max_units": max_units,
                                     "repeats": repeats})
    return res.save(run.results_path("flip"))


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    """A private copy of the tiny run (this file writes results into it)."""
    shutil.copytree(tiny_run.path, tmp_path / "tiny")
    return load(tmp_path / "tiny")


# ----------------------------------------------------------------------------- known answers
def test_forgetting_counts_known_matrix():
    c = np.array([[0, 1, 0, 1, 1, -1, 0],
                  [1, 1, 0, 0, -1, -1, 0],
                  [0, 1, 0, 1, 0, -1, 0],
                  [1, 1, 0, 1, -1, -1, 0],
                  [0, 1, 0, 0, 1, -1, 1]], dtype=np.int8)
    # col 0: 1->0 twice; 1: never forgotten; 2: never learned -> number of rows (5);
    # 3: 1->0 at rows 0-1 and 3-4; 4: presented 1,0,1 (gaps skipped) -> 1; 5: never presented;
    # 6: learned at the last presentation only -> 0
    got = scores.forgetting_events(c)
    np.testing.assert_array_equal(got, [2, 0, 5, 2, 1, np.nan, 0])
    assert got[2] > np.nanmax(np.delete(got, 2))  # never learned ranks as most forgettable


def test_cartography_on_fixed_probabilities():
    p = np.array([[0.2, 1.0, np.nan], [0.4, 1.0, np.nan], [0.9, np.nan, np.nan]])
    loss = -np.log(p)
    np.testing.assert_allclose(scores.confidence(loss), [0.5, 1.0, np.nan], rtol=1e-12)
    np.testing.assert_allclose(scores.variability(loss), [np.sqrt(0.26 / 3), 0.0, np.nan], rtol=1e-12, atol=1e-15)


def test_el2n_on_fixed_logits():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [50.0, 0.0]])
    # softmax (1/2, 1/2) vs label 0; (3/4, 1/4) vs label 1; ~(1, 0) vs label 0
    np.testing.assert_allclose(scores.el2n(logits, [0, 1, 0]), [np.sqrt(0.5), 0.75 * np.sqrt(2), 0.0],
                               rtol=1e-12, atol=1e-12)


def test_aum_final_loss_and_neuron_count_known_answers():
    margin = np.array([[1.0, -2.0, np.nan], [3.0, np.nan, np.nan], [-1.0, 0.0, np.nan]])
    np.testing.assert_allclose(scores.aum(margin), [1.0, -1.0, np.nan])
    np.testing.assert_array_equal(scores.final_loss(np.array([[9.0, 9.0], [0.5, 2.0]])), [0.5, 2.0])
    got = scores.neuron_count([3, 0, 5], [0, 0, 1], [[2, 4], [7, 1], [0, 0]],
                              [[True, True], [True, False], [False, False]], num_examples=7, max_units=10)
    np.testing.assert_array_equal(got, [9.0, np.nan, np.nan, 3.0, np.nan, np.nan, np.nan])  # (7 + 11) / 2


def test_every_score_has_a_direction_and_description():
    for name, s in scores.SCORES.items():
        assert s.direction in (1, -1) and s.description, name
    assert scores.default_epoch_k(30) == 3 and scores.default_epoch_k(4) == 1


# ----------------------------------------------------------------------------- GraNd
def reference_grad_norms(model, x, y):
    """One backward per example in eval mode; norm over every trainable parameter's .grad."""
    model = model.eval()
    out = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))
    model.zero_grad(set_to_none=True)
    return torch.stack(out).detach().numpy()


class Scale(nn.Module):
    """A parameter-owning module without a norm rule (exercises the per-module torch.func path)."""

    def __init__(self, n):
        super().__init__()
        self.g = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.g


class MixedNet(nn.Module):
    """Conv + BN with in-place ReLU; a grouped strided conv without bias on few positions (Gram
    path; conv1 takes the grouped-convolution path); tokens with a LayerNorm (its own rule) and a custom module
    (per-module torch.func path); Linears on (B, T, F) inputs (Gram and materialised paths); a
    top-level parameter."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 32, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(32)
        self.act = nn.ReLU(inplace=True)
        self.pos = nn.Parameter(torch.randn(9, 32))
        self.norm, self.scale = nn.LayerNorm(32), Scale(32)
        self.wide = nn.Linear(32, 64)       # T * (in + out) < in * out: Gram trick
        self.narrow = nn.Linear(64, 3)      # materialised per-example gradient
        self.head = nn.Linear(27, 5)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))                  # (B, 32, 3, 3)
        x = x.flatten(2).mT + self.pos                          # (B, 9, 32)
        x = self.narrow(torch.tanh(self.wide(self.scale(self.norm(x)))))
        return self.head(x.flatten(1))


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


@pytest.mark.parametrize("arch", ["mlp", "lenet", "resnet9", "mixed"])
def test_grad_norms_equal_per_example_loop(arch):
    torch.manual_seed(0)
    model, shape = {
        "mlp": lambda: (build_model("mlp", (1, 8, 8), 10, hidden=(16, 12)), (1, 8, 8)),
        "lenet": lambda: (build_model("lenet", (1, 16, 16), 10), (1, 16, 16)),
        "resnet9": lambda: (build_model("resnet9", (3, 16, 16), 10, width=4), (3, 16, 16)),
        "mixed": lambda: (MixedNet(), (2, 7, 7)),
    }[arch]()
    model = model.double()
    _randomise_bn(model)
    model.train()                      # grad_norms must evaluate in eval mode and restore this
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(7, *shape, dtype=torch.float64), torch.randint(0, 3, (7,))
    ref = reference_grad_norms(copy.deepcopy(model), x, y)
    for method in ("hooks", "vmap", "loop"):
        got = scores.grad_norms(model, x, y, method=method, batch_size=3)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=0, err_msg=method)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_grad_norms_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 3, hidden=(8,)).double()
    model.fc1.weight.requires_grad_(False)
    x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = reference_grad_norms(copy.deepcopy(model), x, y)  # .grad of the frozen weight stays None
    for method in ("hooks", "vmap"):
        np.testing.assert_allclose(scores.grad_norms(model, x, y, method=method), ref, rtol=1e-10)


def test_grad_norms_free_their_activations():
    """Each batch's hook records (inputs, outputs, output gradients) are freed: an output's gradient
    hook held its record, which held the output, a cycle the collector could not see (230 MB kept
    per lenet call)."""
    import gc
    from memloc.analyses.scores.gradnorm import _Call
    torch.manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    for _ in range(2):
        scores.grad_norms(model, x, y, batch_size=16)
    gc.collect()
    assert sum(type(o) is _Call for o in gc.get_objects()) == 0      # type(): no attribute lookups


def test_grad_norms_reused_module_needs_vmap():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    torch.manual_seed(0)
    model = Twice().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    with pytest.raises(ValueError, match="runs 2 times.*vmap"):
        scores.grad_norms(model, x, y, method="hooks")
    np.testing.assert_allclose(scores.grad_norms(model, x, y, method="vmap"), reference_grad_norms(model, x, y),
                               rtol=1e-10)
    with pytest.raises(ValueError, match="valid: hooks, vmap, loop"):
        scores.grad_norms(model, x, y, method="magic")


# ----------------------------------------------------------------------------- from a run / CLI
def test_cli_writes_every_score_with_attrs(tiny_copy, capsys):
    run = tiny_copy
    write_flip_h5(run, [4, 1, 2], [0, 0, 1], [[3], [200], [0]], [[True], [False], [False]], max_units=50)
    res = cli_run("scores", [str(run.path), "--device", "cpu"])
    assert run.results_path("scores").is_file()
    stored = run.result("scores")
    assert stored.equals(res)
    assert sorted(stored.data_vars) == sorted(scores.SCORES)
    np.testing.assert_array_equal(stored["example"].values, np.arange(run.num_train))
    for name, da in stored.data_vars.items():
        assert da.shape == (run.num_train,) and da.dims == ("example",)
        assert da.attrs["direction"] == scores.SCORES[name].direction and da.attrs["description"]
    k = scores.default_epoch_k(run.final_epoch)
    assert stored["el2n"].attrs["epoch"] == k == stored.config["checkpoint_k"]
    nc = stored["neuron_count"].values
    aum = stored["aum"].values
    el2n = stored["el2n"].values
    expected = np.full(run.num_train, np.nan)
    expected[[4, 1]] = [3, 51]           # not flipped counts max_units + 1; status 1 has no score
    np.testing.assert_array_equal(nc, expected)
    np.testing.assert_allclose(aum, np.nanmean(run.dynamics("margin", "presentation")[1:], axis=0), rtol=1e-6)
    # EL2N from the run's checkpoint of epoch k, by hand
    model, data = run.model(k), run.data()
    with torch.no_grad():
        p = model(data.train.x).double().softmax(1)
    by_hand = (p - F.one_hot(data.train.y, p.shape[1])).norm(dim=1).numpy()
    np.testing.assert_allclose(el2n, by_hand, rtol=1e-5)
    assert "neuron_count" in capsys.readouterr().out


def test_cli_subset_epoch_and_no_flip(tiny_copy, capsys):
    cli_run("scores", [str(tiny_copy.path), "--scores", "grand,forgetting", "--checkpoint-k", "2"])
    stored = tiny_copy.result("scores")
    assert sorted(stored.data_vars) == ["forgetting", "grand"]
    assert stored["grand"].attrs["epoch"] == 2
    grand = stored["grand"].values
    run = tiny_copy
    model, data = run.model(2), run.data()
    rows = np.arange(0, run.num_train, 97)
    np.testing.assert_allclose(grand[rows], reference_grad_norms(model, data.train.x[rows], data.train.y[rows]),
                               rtol=1e-4)
    cli_run("scores", [str(tiny_copy.path), "--overwrite"])   # "all" without flip.h5: neuron_count skipped
    assert "neuron_count skipped" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--scores", "el2n,bogus"], "unknown score 'bogus'; valid: all, final_loss"),
    (["--scores", "neuron_count"], "--scores: neuron_count needs results/flip.h5, not in"),
    (["--checkpoint-k", "99"], "--checkpoint-k must be an integer in [0, 4]"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),   # range-checked by argparse now
])
def test_cli_errors_exit_2(tiny_copy, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli_run("scores", [str(tiny_copy.path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not tiny_copy.results_path("scores").exists()


def test_cli_no_run_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_run("scores", [str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no run.json" in err and "Traceback" not in err


def test_corrupt_flip_file_is_a_user_error(tiny_copy, capsys):
    path = tiny_copy.results_path("flip")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not hdf5")
    with pytest.raises(SystemExit) as e:
        cli_run("scores", [str(tiny_copy.path), "--scores", "neuron_count"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot read result file" in err and "flip.h5" in err and "Traceback" not in err
