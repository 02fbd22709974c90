"""memloc.gradients: per-layer clean / noisy / total gradient norms and cosines.

Error paths and atomic writing of all three layer analyses are tested in test_rewind.py.
"""
import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memloc.cli import run as cli_run
from memloc.core.models import build_model
from memloc.core.units import trace

G = importlib.import_module("memloc.analyses.gradients")   # memloc.gradients is the function

# the old per-quantity arrays, as views of the result: norm (checkpoint, layer, subset), cosine (checkpoint, layer)
PART = {"norm_clean": "clean", "norm_noisy": "noisy", "norm_total": "all"}


def quantity(res, q):
    """``q`` of :data:`G.QUANTITIES` as a (checkpoint, layer) DataArray of a gradients result."""
    return res["cosine"] if q == "cosine" else res["norm"].sel(subset=PART[q])


def reference(model, examples, is_noisy, layers, *, batch_size=None):
    """Slow reference in float64: one backward per loss, straight from the definitions.

    ``batch_size=None``: one full-batch forward (eval mode); otherwise the given batches in order
    (train-mode batch statistics), each loss being the sum over batches of per-example losses / count.
    """
    m = copy.deepcopy(model).double()
    x, y = examples.x.double(), examples.y
    noisy = torch.as_tensor(is_noisy)[examples.idx]
    n = len(y)
    bounds = [(0, n)] if batch_size is None else [(s, s + batch_size) for s in range(0, n, batch_size)]
    params = {k: p for k, p in m.named_parameters()}

    def grad(mask):
        total = sum(F.cross_entropy(m(x[a:b]), y[a:b], reduction="none")[mask[a:b]].sum() for a, b in bounds)
        g = torch.autograd.grad(total / mask.sum(), [params[k] for l in layers for k in l.params])
        out, i = [], 0
        for l in layers:
            out.append(torch.cat([t.flatten() for t in g[i:i + len(l.params)]]))
            i += len(l.params)
        return out

    gc, gn, gt = grad(~noisy), grad(noisy), grad(torch.ones(n, dtype=torch.bool))
    root = np.sqrt([l.numel for l in layers])
    return {"norm_clean": np.array([float(g.norm()) for g in gc]) / root,
            "norm_noisy": np.array([float(g.norm()) for g in gn]) / root,
            "norm_total": np.array([float(g.norm()) for g in gt]) / root,
            "cosine": np.array([float(a @ b / (a.norm() * b.norm())) for a, b in zip(gc, gn)])}


def assert_close(got, want, rtol=2e-4):
    for q in G.QUANTITIES:
        np.testing.assert_allclose(got[q], want[q], rtol=rtol, atol=1e-7, err_msg=q)


@pytest.mark.parametrize("epoch", [0, 4])
def test_matches_autograd_reference_eval_mode(tiny_run, epoch):
    data = tiny_run.data()
    model = tiny_run.model(epoch)
    layers = trace(model, data.train.x[:2]).layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = G.layer_gradients(model, data.train, data.is_noisy, layers, batch_size=100)
    assert_close(got, reference(model, data.train, data.is_noisy, layers))
    # the total is the weighted combination of the clean and noisy parts, checked against a direct
    # total-loss gradient above; the model is left as it was (no .grad, same tensors, eval mode)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training
    assert np.all(got["norm_noisy"] > 0) and np.all(np.abs(got["cosine"]) <= 1)


def bn_model(data):
    torch.manual_seed(1)
    model = build_model("resnet9", data.in_shape, data.num_classes, width=4)
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_bn_train_mode_uses_batch_statistics_and_keeps_running_stats(tiny_run):
    data = tiny_run.data()
    data.train = data.train.subset(np.arange(300))  # keep it quick
    model = bn_model(data)
    layers = trace(model, data.train.x[:2]).layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    is_noisy = data.is_noisy
    got = G.layer_gradients(model, data.train, is_noisy, layers, batch_size=64, bn_mode="train")
    assert_close(got, reference(model.train(), data.train, is_noisy, layers, batch_size=64))
    model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # running stats too
    got_eval = G.layer_gradients(model, data.train, is_noisy, layers, batch_size=64)
    assert_close(got_eval, reference(model, data.train, is_noisy, layers))
    assert not np.allclose(got["norm_total"], got_eval["norm_total"])
    with pytest.raises(ValueError, match="valid: eval, train"):
        G.layer_gradients(model, data.train, is_noisy, layers, bn_mode="bogus")


def test_bn_train_mode_sees_example_tied_dropout_in_test_mode(tiny_run):
    """A dropout layer hooked on a BatchNorm follows its train flag; gradients keeps it in test mode."""
    from memloc.core.dropout import insert_example_tied_dropout, set_mode
    data = tiny_run.data()
    data.train = data.train.subset(np.arange(200))
    model = bn_model(data)
    insert_example_tied_dropout(model, after=["prep.1", "layer2"], p_gen=0.4, p_mem=0.2)
    layers = trace(model, data.train.x[:2]).layers
    got = G.layer_gradients(model, data.train, data.is_noisy, layers, batch_size=64, bn_mode="train")
    set_mode(model, "test")
    assert_close(got, G.layer_gradients(model, data.train, data.is_noisy, layers, batch_size=64, bn_mode="train"))
    set_mode(model, "drop")
    dropped = G.layer_gradients(model, data.train, data.is_noisy, layers, batch_size=64, bn_mode="train")
    assert not np.allclose(got["norm_total"], dropped["norm_total"])   # the mode reaches the copy


def test_without_noisy_examples_noisy_quantities_are_nan(tiny_run):
    data = tiny_run.data()
    model = tiny_run.model()
    layers = trace(model, data.train.x[:2]).layers
    got = G.layer_gradients(model, data.clean_train, data.is_noisy, layers)
    assert np.isnan(got["norm_noisy"]).all() and np.isnan(got["cosine"]).all()
    np.testing.assert_allclose(got["norm_total"], got["norm_clean"], rtol=1e-12)


def test_cli_file_matches_library(tiny_run, capsys):
    res = cli_run("gradients", [str(tiny_run.path), "--checkpoints", "0,2-4", "--layers", "fc1,head",
                                "--device", "cpu", "--overwrite"])
    data = tiny_run.data()
    f = tiny_run.result("gradients")
    assert f.attrs["memloc_schema"] == "memloc.gradients"
    assert f.config["bn_mode"] == "eval"
    assert list(f["checkpoint"].values) == [0, 2, 3, 4]
    assert list(f["layer"].values) == ["fc1", "head"]
    assert f["norm"].dims == ("checkpoint", "layer", "subset") and list(f["subset"].values) == ["clean", "noisy", "all"]
    for q in G.QUANTITIES:
        assert quantity(f, q).dims == ("checkpoint", "layer") and quantity(f, q).shape == (4, 2)
        np.testing.assert_array_equal(quantity(f, q).values, quantity(res, q).values)
    model = tiny_run.model(3)
    layers = [l for l in trace(model, data.train.x[:2]).layers if l.name in ("fc1", "head")]
    want = G.layer_gradients(model, data.train, data.is_noisy, layers)
    for q in G.QUANTITIES:
        np.testing.assert_allclose(quantity(f, q).values[2], want[q], rtol=1e-6)
    assert "gradients.h5" in capsys.readouterr().out


def test_mlp_clean_and_noisy_gradients_conflict(mlp_run):
    """The acceptance figures: clean and noisy gradients point against each other, and the mean
    noisy loss pulls at least as hard as the mean clean loss on every layer."""
    res = cli_run("gradients", [str(mlp_run.path), "--device", "cpu", "--overwrite"])
    cosine, noisy, clean = (quantity(res, q).values for q in ("cosine", "norm_noisy", "norm_clean"))
    epochs = np.asarray(mlp_run.epochs)
    assert list(res["checkpoint"].values) == list(epochs)
    later = epochs >= 2
    assert np.nanmean(cosine[later]) < 0
    assert np.all(cosine[later].mean(0) < 0)  # every layer
    assert np.all(noisy[later].mean(0) > clean[later].mean(0))
