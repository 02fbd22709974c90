"""memloc.scale.prefix: rewind and retrain compute the frozen prefix once, with bit-for-bit the same results;
where the prefix cannot be cut (skip connections, functional operations, shared weights) they fall
back to the plain computation by themselves."""
import numpy as np
import pytest
import torch
from torch import nn

import memloc.scale.prefix as P
from memloc.core.data import make_data
from memloc.core.errors import MemlocError
from memloc.analyses.retrain import retrain, retrain_layer
from memloc.analyses.rewind import rewind, rewind_layers
from memloc.core.selection import select_layers
from memloc.training.train import train
from memloc.core.units import trace


@pytest.fixture(scope="module")
def rn_run(tmp_path_factory):
    """A tiny ResNet-9 (BatchNorm everywhere, residual blocks) on digits."""
    return train(tmp_path_factory.mktemp("runs") / "rn", {"dataset": "digits", "model": "resnet9", "width": 4,
                                                         "epochs": 2, "batch_size": 64, "lr": 0.1}, device="cpu")


@pytest.fixture(scope="module")
def lenet2_run(tmp_path_factory):
    """lenet on mnist5k, two epochs."""
    return train(tmp_path_factory.mktemp("runs") / "lenet", {"model": "lenet", "epochs": 2}, device="cpu")


@pytest.fixture()
def runs(request, tiny_run, rn_run, lenet2_run):
    return {"mlp": tiny_run, "resnet9": rn_run, "lenet": lenet2_run}


def cuts_of(run, **kw):
    data, model = run.data(), run.model()
    layers = trace(model, data.train.x[:2]).layers
    return {l.name: c for l, c in zip(layers, P.PrefixCache(model, layers, data, **kw).cuts)}


def assert_same(a, b):
    for name in ("accuracy", "baseline"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert a.config == b.config


@pytest.mark.parametrize("name", ["mlp", "resnet9", "lenet"])
def test_rewind_identical_with_and_without_prefix_reuse(name, runs):
    run = runs[name]
    assert sum(c is not None for c in cuts_of(run).values()) >= 2   # the cache is really used
    on = rewind(run, checkpoints="0,1", device="cpu")
    off = rewind(run, checkpoints="0,1", device="cpu", prefix_cache=False)
    assert_same(on, off)


RETRAIN_LAYERS = {"mlp": "fc2,head", "resnet9": "layer1.1.res2.0,layer3.0.0,linear",
                  "lenet": "features.3,classifier.2"}


@pytest.mark.parametrize("name", ["mlp", "resnet9", "lenet"])
def test_retrain_identical_with_and_without_prefix_reuse(name, runs, monkeypatch):
    run = runs[name]
    checked = []
    real = P.PrefixCache.same_rows

    def spy(self, *a):
        checked.append(real(self, *a))
        return checked[-1]

    monkeypatch.setattr(P.PrefixCache, "same_rows", spy)
    on = retrain(run, layers=RETRAIN_LAYERS[name], epochs=2, device="cpu")
    assert checked and all(checked)     # the training batches took the cached rows
    off = retrain(run, layers=RETRAIN_LAYERS[name], epochs=2, device="cpu", prefix_cache=False)
    assert_same(on, off)


def test_retrained_weights_identical_and_training_falls_back_alone(rn_run, monkeypatch):
    """Bit for bit the same retrained model (BN statistics of the layer included); when the cached
    rows do not round like a batch of their own, only the training batches go the plain way."""
    data, model = rn_run.data(), rn_run.model()
    layer = select_layers(trace(model, data.train.x[:2]), "layer1.1.res2.0")[0]
    kw = dict(epochs=2, batch_size=64)
    results = [retrain_layer(model, rn_run.checkpoint(0), layer, data, prefix_cache=pc, **kw) for pc in (True, False)]
    monkeypatch.setattr(P.PrefixCache, "same_rows", lambda self, *a: False)
    results.append(retrain_layer(model, rn_run.checkpoint(0), layer, data, **kw))
    for curve, net in results[1:]:
        assert np.array_equal(curve, results[0][0])
        state = results[0][1].state_dict()
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_cuts_of_the_built_in_models(tiny_run, rn_run):
    mlp = cuts_of(tiny_run)
    assert mlp["fc1"] is None                       # nothing with weights before it
    assert mlp["head"].module == "head" and mlp["head"].skip == ("flatten", "fc1", "act1", "fc2", "act2")
    rn = cuts_of(rn_run)
    assert rn["prep.0"] is None
    assert rn["layer1.1.res1.0"].module == "layer1.1.res1.0"
    # the residual's input bypasses res2: its cut is the whole residual block, whose input is all that flows on
    assert rn["layer1.1.res2.0"].module == "layer1.1" and rn["layer1.1.res2.0"].skip == ("prep", "layer1.0")
    assert rn["linear"].skip == ("prep", "layer1", "layer2", "layer3", "pool", "flatten")
    # the budget keeps the deepest cuts; none without one
    rows = len(rn_run.data().train) + len(rn_run.data().test)
    small = cuts_of(rn_run, budget_mb=1.5 * rn["linear"].row_bytes * rows / 2 ** 20)
    assert [n for n, c in small.items() if c] == ["linear"]
    assert set(cuts_of(rn_run, budget_mb=0).values()) == {None}
    assert set(cuts_of(rn_run, enabled=False).values()) == {None}


# --------------------------------------------------------------------------- models that cannot be cut
class LongSkip(nn.Module):
    """f1's output reaches the logits past f2, f3 and the head: only f2 (whose input it is) can be cut."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2, self.f3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.head, self.g = nn.Linear(32, 4), nn.Linear(32, 4)

    def forward(self, x):
        a = torch.relu(self.f1(x))
        return self.head(torch.relu(self.f3(torch.relu(self.f2(a))))) + self.g(a)


class Functional(nn.Module):
    """A functional operation between fc1 and fc2 (not a module: skipping fc1 does not skip it, and
    every later cut would skip fc1)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.tanh(self.fc1(x)) * 2)))


class Reader(nn.Module):
    """Adds the sum of another module's bias (held outside the module tree)."""

    def __init__(self, other):
        super().__init__()
        self.other = [other]

    def forward(self, x):
        return x + self.other[0].bias.sum()


class Shared(nn.Module):
    """``block`` runs twice; ``reader``, before the head, reads the head's bias (the cut at the head
    agrees with the final weights, not with any others)."""

    def __init__(self):
        super().__init__()
        self.fc, self.block, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.act, self.reader = nn.ReLU(), Reader(self.head)

    def forward(self, x):
        x = self.reader(self.act(self.fc(x)))
        return self.head(self.block(self.act(self.block(x))))


@pytest.mark.parametrize("cls, expected", [
    (LongSkip, {"f1": None, "f2": "f2", "f3": None, "head": None, "g": None}),
    (Functional, {"fc1": None, "fc2": None, "head": None}),
    (Shared, {"fc": None, "block": None, "head": None}),
])
def test_falls_back_where_the_prefix_cannot_be_cut(cls, expected):
    gen = torch.Generator().manual_seed(0)
    data = make_data(torch.randn(300, 16, generator=gen), torch.randint(0, 4, (300,), generator=gen),
                     torch.randn(50, 16, generator=gen), torch.randint(0, 4, (50,), generator=gen))
    torch.manual_seed(0)
    model, early = cls(), cls()
    layers = trace(model, data.train.x[:2]).layers
    cuts = P.PrefixCache(model, layers, data).cuts
    assert {l.name: c and c.module for l, c in zip(layers, cuts)} == expected
    states = [early.state_dict(), {k: v * 0.5 for k, v in model.state_dict().items()}]
    on = rewind_layers(model, states, layers, data, batch_size=64)
    off = rewind_layers(model, states, layers, data, batch_size=64, prefix_cache=False)
    for a, b in zip(on, off):
        np.testing.assert_array_equal(a, b)
    for l in layers:
        got = [retrain_layer(model, early.state_dict(), l, data, epochs=1, batch_size=64, prefix_cache=pc)[0]
               for pc in (True, False)]
        np.testing.assert_array_equal(*got)


def test_budget_is_range_checked(tiny_run):
    for f in (rewind, retrain):
        with pytest.raises(MemlocError, match="prefix_cache_mb must be"):
            f(tiny_run, prefix_cache_mb=-1)
