"""memloc.retrain: reset one layer, retrain only it on clean data; nothing else may change.

Error paths and atomic writing are tested with the other layer analyses in test_rewind.py.
"""
import copy
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memloc.cli import run as cli_run
from memloc.core.evaluate import SUBSETS
from memloc.core.optim import epoch_seed
from memloc.analyses.rewind import rewind_layers
from memloc.core.selection import select_layers
from memloc.training.train import train
from memloc.core.units import trace

RT = importlib.import_module("memloc.analyses.retrain")   # memloc.retrain is the function


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    """A tiny ResNet-9 (BatchNorm everywhere) on digits."""
    return train(tmp_path_factory.mktemp("runs") / "rn", {"dataset": "digits", "model": "resnet9", "width": 4,
                                                         "epochs": 2, "batch_size": 64, "lr": 0.1})


def layer_of(run, data, name):
    return select_layers(trace(run.model(), data.train.x[:2]), name)[0]


def test_only_the_layer_changes_not_even_other_bn_buffers(bn_run):
    data = bn_run.data()
    model, final, init = bn_run.model(), bn_run.checkpoint(), bn_run.checkpoint(0)
    layer = layer_of(bn_run, data, "layer1.1.res1.0")
    assert layer.buffers and len(layer.modules) == 2  # conv + its BatchNorm
    curve, new = RT.retrain_layer(model, init, layer, data, epochs=2, batch_size=64)
    assert curve.shape == (3, len(SUBSETS))
    state = new.state_dict()
    others = [k for k in final if k not in layer.keys]
    assert any(k.endswith("running_mean") for k in others)
    for k in others:  # every other parameter and buffer, bit for bit
        assert torch.equal(state[k], final[k]), k
    for k in layer.keys:  # the layer itself was reset and then trained (including its own BN stats)
        if k.endswith("num_batches_tracked"):
            assert state[k] > init[k]
        else:
            assert not torch.equal(state[k], init[k]) and not torch.equal(state[k], final[k]), k
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())  # caller's model untouched
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    # row 0 is the model right after the reset: the same as rewinding the layer to epoch 0
    assert np.array_equal(curve[0], rewind_layers(model, [init], [layer], data)[0][0, 0])


def test_deterministic(tiny_run):
    data = tiny_run.data()
    layer = layer_of(tiny_run, data, "fc2")
    a, ma = RT.retrain_layer(tiny_run.model(), tiny_run.checkpoint(0), layer, data, epochs=1, seed=3)
    b, mb = RT.retrain_layer(tiny_run.model(), tiny_run.checkpoint(0), layer, data, epochs=1, seed=3)
    assert np.array_equal(a, b)
    assert all(torch.equal(v, mb.state_dict()[k]) for k, v in ma.state_dict().items())
    c, mc = RT.retrain_layer(tiny_run.model(), tiny_run.checkpoint(0), layer, data, epochs=1, seed=4)
    assert not torch.equal(mc.fc2.weight, ma.fc2.weight)


def reference_retrain(model, init, layer, clean, *, epochs, lr, batch_size, momentum, weight_decay, seed):
    """Hand-written SGD (Nesterov, weight decay) with a triangular lr peaking half-way."""
    m = copy.deepcopy(model).eval()
    params = [m.get_parameter(k) for k in layer.params]
    with torch.no_grad():
        for k, p in zip(layer.params, params):
            p.copy_(init[k])
    bufs = [torch.zeros_like(p) for p in params]
    n = len(clean)
    total, step = math.ceil(n / batch_size) * epochs, 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        for s in range(0, n, batch_size):
            rows = order[s:s + batch_size]
            grads = torch.autograd.grad(F.cross_entropy(m(clean.x[rows]), clean.y[rows]), params)
            t = step / total
            rate = lr * (t / 0.5 if t < 0.5 else (1 - t) / 0.5)
            step += 1
            with torch.no_grad():
                for p, g, b in zip(params, grads, bufs):
                    g = g + weight_decay * p
                    b.mul_(momentum).add_(g)
                    p.sub_(rate * (g + momentum * b))
    return m


def test_matches_hand_written_one_cycle_sgd(tiny_run):
    data = tiny_run.data()
    layer = layer_of(tiny_run, data, "head")
    hyper = dict(epochs=3, lr=0.1, batch_size=100, momentum=0.9, weight_decay=5e-4, seed=0)
    assert len(data.clean_train) % 100 > 1  # no single-example batch (those are skipped)
    _, got = RT.retrain_layer(tiny_run.model(), tiny_run.checkpoint(0), layer, data, **hyper)
    want = reference_retrain(tiny_run.model(), tiny_run.checkpoint(0), layer, data.clean_train, **hyper)
    for k in layer.params:
        torch.testing.assert_close(got.get_parameter(k), want.get_parameter(k), rtol=1e-5, atol=1e-6)


def test_cli_on_mlp_run(mlp_run):
    """Schema, and what holds on the MNIST MLP: every layer retrained alone on clean data fits the
    clean data again, and the noisy labels come back (if at all) far less than before."""
    acc = cli_run("retrain", [str(mlp_run.path), "--epochs", "5", "--device", "cpu", "--overwrite"])["accuracy"].values
    f = mlp_run.result("retrain")
    assert f.attrs["memloc_schema"] == "memloc.retrain"
    cfg = f.config
    assert (cfg["epochs"], cfg["lr"], cfg["reset_to"]) == (5, 0.1, 0)
    assert list(f["layer"].values) == ["fc1", "fc2", "head"]
    assert list(f["epoch"].values) == list(range(6))
    assert f["accuracy"].dims == ("layer", "epoch", "subset") and f["accuracy"].shape == (3, 6, 4)
    np.testing.assert_array_equal(f["accuracy"].values, acc)
    baseline = f["baseline"].values
    clean, noisy, test = (SUBSETS.index(s) for s in ("clean", "noisy", "test"))
    assert baseline[noisy] > 0.95
    assert np.all(acc[:, -1, clean] > 0.98)
    assert np.all(acc[:, -1, noisy] < baseline[noisy] - 0.1)
    assert np.all(acc[:, -1, test] > baseline[test] - 0.05)
