"""flip --site weight (the official rule) and --protocol paper.

``reference_weight_flip`` mirrors the authors' released ``neuron_flipping`` code item by item: a fresh
copy of the model per example in eval mode, ``loss.backward()`` into ``param.grad``, every named
parameter scored by ``param.data * param.grad`` (summed over in-channels and kernel for a conv
filter), the highest score zeroed with ``param[index] = 0`` if it is above 0. The objective and its
inputs (target copies, reference batch without the target) are memloc's, shared with the unit site.
``scripts/bench_flip.py`` loads it from this file.
"""
import copy
import importlib
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memloc.cli import run as cli_run
from memloc.core.data import make_data

flip = importlib.import_module("memloc.analyses.flip")
weights = importlib.import_module("memloc.analyses.flip.weights")


@pytest.fixture(autouse=True)
def _leave_shared_runs_clean(request):
    yield
    for name in ("mlp_run", "tiny_run"):
        if name in request.fixturenames:
            out = request.getfixturevalue(name).results_path("flip")
            out.unlink(missing_ok=True)
            if out.with_name("flip.partial").exists():
                shutil.rmtree(out.with_name("flip.partial"))


def reference_weight_flip(model, x, y, target_id, ref_x, ref_y, ref_ids, repeat, *, max_units=100,
                          noise_samples=0, noise_ratio=0.01, seed=0, dtype=torch.float64):
    """One search with the official rule, one item at a time. Returns (zeroed item ids, flipped)."""
    model = copy.deepcopy(model).to(dtype).eval()
    offsets, total = {}, 0
    for name, p in model.named_parameters():           # global item ids, to compare with memloc's
        offsets[name] = total
        total += p.shape[0] if p.dim() >= 3 else p.numel()
    keep = torch.as_tensor(np.asarray(ref_ids)) != target_id
    items = []
    while True:
        xt = flip.noisy_copies(x.to(dtype), noise_samples, noise_ratio,
                               flip.noise_seed(seed, target_id, repeat, len(items)))
        model.zero_grad()
        logits = model(torch.cat([xt, ref_x.to(dtype)]))
        target = logits[:len(xt)].mean(0)
        if int(target.argmax()) != int(y):
            return items, True
        if len(items) == min(max_units, total):
            return items, False
        objective = (F.cross_entropy(logits[len(xt):][keep], ref_y[keep])
                     - F.cross_entropy(target[None], torch.tensor([int(y)])))
        objective.backward()
        best, best_name, best_index = 0.0, None, None
        for name, p in model.named_parameters():
            score = p.data * p.grad
            if p.dim() >= 3:
                score = score.sum(dim=tuple(range(1, p.dim())))
            if float(score.max()) > best:
                best, best_name, best_index = float(score.max()), name, int(score.argmax())
        if best_name is None:
            return items, False
        with torch.no_grad():
            p = dict(model.named_parameters())[best_name]
            if p.dim() >= 3:
                p[best_index] = 0
            else:
                p.view(-1)[best_index] = 0
        items.append(offsets[best_name] + best_index)


def _check_equal(model, x, y, ids, rx, ry, refs, *, group_size, **kw):
    search = weights.WeightFlipSearch(model, rx, ry, refs, dtype=torch.float64)
    tasks = [(k, r) for k in range(len(ids)) for r in range(len(refs))]
    got = {(t.k, t.repeat): (t.units.tolist(), t.flipped)
           for t in search.run(x, y, ids, tasks, group_size=group_size, **kw)}
    assert sorted(got) == tasks
    for k, r in tasks:
        want = reference_weight_flip(model, x[k], y[k], int(ids[k]), rx[r], ry[r], refs[r], r, **kw)
        assert got[(k, r)] == want, f"example {ids[k]} repeat {r}"
    return got, search


@pytest.mark.slow
def test_weight_site_equals_official_rule_mlp(mlp_run):
    data, model = mlp_run.data(), mlp_run.model()
    ids = flip.select_examples("noisy:3,clean:2", mlp_run.is_noisy, seed=1)
    refs = flip.reference_batches(np.flatnonzero(~mlp_run.is_noisy), 16, 2, seed=1)
    refs[1, 0] = ids[-1]
    r = torch.as_tensor(refs)
    x, y = data.train.x[ids], data.train.y[ids]
    got, search = _check_equal(model, x, y, ids, data.train.x[r], data.train.y[r], refs, group_size=3, max_units=25)
    assert any(f for _, f in got.values()) and max(len(u) for u, _ in got.values()) > 2
    # with noise-averaged logits (the paper protocol's copies)
    _check_equal(model, x[:2], y[:2], ids[:2], data.train.x[r[:1]], data.train.y[r[:1]], refs[:1], group_size=2,
                 max_units=15, noise_samples=3, noise_ratio=0.05, seed=4)
    # items are counted per parameter: the MLP's linear weights and biases element by element
    assert search.structure.n_units == sum(p.numel() for p in model.parameters())


def _conv_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32, 5))
    x = torch.randn(50, 1, 8, 8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()
        model(x * 2 + 0.5)
    return model.eval(), x


def test_weight_site_equals_official_rule_conv_bn():
    model, x = _conv_bn()
    with torch.no_grad():
        y = model(x).argmax(1)
    ids = np.arange(50)
    refs = np.stack([np.arange(20, 36), np.arange(34, 50)])
    r = torch.as_tensor(refs)
    before = copy.deepcopy(model.state_dict())
    got, search = _check_equal(model, x[:5], y[:5], ids[:5], x[r], y[r], refs, group_size=4, max_units=20)
    assert any(f for _, f in got.values())
    s = {sp.name: sp for sp in search.structure.spaces}
    assert s["0.weight"].size == 6 and s["4.weight"].size == 8      # one item per conv filter
    assert s["1.weight"].size == 6 and s["9.weight"].size == 160     # BN scale, linear weight: per element
    chosen = np.concatenate([u for u, _ in got.values()])
    space = np.searchsorted([sp.offset for sp in search.structure.spaces], chosen, side="right") - 1
    assert len(np.unique(space)) > 1          # the searches zero items of more than one parameter
    # the caller's model is never edited
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weight_masks_restore_and_match_manual_zeroing():
    model, x = _conv_bn()
    items = weights.weight_items(model)
    before = copy.deepcopy(model.state_dict())
    mask = torch.ones(items.n_units)
    off = {sp.name: sp.offset for sp in items.spaces}
    mask[[off["0.weight"], off["1.weight"] + 1, off["9.weight"] + 3]] = 0   # conv filter, BN scale, linear weight
    manual = copy.deepcopy(model)
    with torch.no_grad():
        manual[0].weight[0] = 0
        manual[1].weight[1] = 0
        manual[9].weight.view(-1)[3] = 0
    with weights.weight_masks(model, items, mask):
        assert torch.equal(model(x), manual(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError):
        with weights.weight_masks(model, items, mask):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_positive_score_stops_unflipped():
    """Where no item scores above 0 the official loop would never end; memloc records 'not flipped'.
    Here the reference is a copy of the target (same input and label): O = 0 for every weight."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.tensor([[1.0, -0.5]]), torch.tensor([0])
    with torch.no_grad():
        y[0] = int(model(x).argmax())
    search = weights.WeightFlipSearch(model, x[None], y[None], np.array([[1]]), dtype=torch.float64)
    (t,) = list(search.run(x, y, np.array([0]), [(0, 0)], max_units=10))
    assert (t.units.tolist(), t.flipped) == ([], False)
    assert reference_weight_flip(model, x[0], y[0], 0, x, y, np.array([1]), 0, max_units=10) == ([], False)


def test_cli_weight_site_and_paper_protocol(mlp_run, capsys):
    run = str(mlp_run.path)
    cli_run("flip", [run, "--examples", "noisy:4,clean:4", "--site", "weight", "--max-units", "40", "--device", "cpu"])
    res = mlp_run.result("flip")
    assert res.config["site"] == "weight" and "items" in capsys.readouterr().out
    names = [n for n, _ in mlp_run.model().named_parameters()]
    assert list(res["layer"].values) == names                    # histogram by parameter
    assert (res["layer_hist"].values.sum(-1) == res["n_units"].values).all()
    # the paper protocol: weight site, 5 noisy copies, B = 512 (capped at the clean pool), explicit options win
    cli_run("flip", [run, "--examples", "noisy:2", "--protocol", "paper", "--ref-batch-size", "100",
                     "--max-units", "20", "--device", "cpu", "--overwrite"])
    cfg = mlp_run.result("flip").config
    assert (cfg["site"], cfg["noise_samples"], cfg["ref_batch_size"], cfg["ref_pool"]) == ("weight", 5, 100, "clean")
    opts = flip.driver.protocol_options("paper", np.array([True] * 3 + [False] * 300))
    assert opts["ref_batch_size"] == 300 and opts["site"] == "weight"
    with pytest.raises(SystemExit) as e:
        cli_run("flip", [run, "--protocol", "nope", "--device", "cpu"])
    assert e.value.code == 2 and "--protocol" in capsys.readouterr().err


@pytest.mark.slow
def test_unlearn_zero_and_importance_after_weight_site_flip(mlp_run):
    from memloc.analyses.importance import importance
    from memloc.actions.unlearn import _zero_context
    cli_run("flip", [str(mlp_run.path), "--examples", "noisy:3", "--site", "weight", "--max-units", "40",
                     "--device", "cpu"])
    data, model = mlp_run.data(), mlp_run.model()
    before = copy.deepcopy(model.state_dict())
    ctx, items = _zero_context(mlp_run, model, data, np.flatnonzero(mlp_run.is_noisy))
    assert len(items)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])     # the MLP: one item per element
    with ctx():
        inside = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.all(inside[items] == 0) and np.array_equal(np.delete(inside.numpy(), items), np.delete(flat.numpy(), items))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # importance does not compare units with parameter items
    assert "flip_overlap" not in importance(mlp_run, subsets="clean,noisy", device="cpu")


def test_only_conv_weights_are_filters():
    """A 3-D parameter that is not a conv weight (a ViT's position embedding) is zeroed element by element."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 2)
            self.pos = nn.Parameter(torch.randn(1, 3, 4))

    items = {sp.name: sp for sp in weights.weight_items(Tokens()).spaces}
    assert (items["conv.weight"].size, items["conv.weight"].filter) == (3, True)
    assert (items["pos"].size, items["pos"].filter) == (12, False) and items["conv.bias"].size == 3


def _dense_model(norm: bool):
    """A random dense classifier (300 classes) whose two weights (72,000 items each) are large enough
    to be scored by bounded rows; ``norm`` adds a LayerNorm (a parameter outside any linear layer)."""
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(300, 240)] + ([nn.LayerNorm(240)] if norm else []) + [
        nn.ReLU(), nn.Linear(240, 300)]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(40, 3, 10, 10)
    with torch.no_grad():
        y = model(x).argmax(1)
    refs = np.stack([np.arange(10, 26), np.arange(24, 40)])
    refs[1, 0] = 2                                   # a target inside its own reference batch
    return model, x, y, refs


@pytest.mark.parametrize("norm", [False, True])
def test_dense_models_equal_official_rule(norm):
    """Models without conv filters: linear layers only run as one stacked group (per-search
    zeroings as corrections of shared weights); with other parameters, one search at a time. Both
    score large linear weights by the rows whose bound reaches the best score, reuse the first
    layer's reference rows, and must zero exactly the official loop's items."""
    model, x, y, refs = _dense_model(norm)
    r = torch.as_tensor(refs)
    ids = np.arange(len(x))
    got, search = _check_equal(model, x[:5], y[:5], ids[:5], x[r], y[r], refs, group_size=3, max_units=12,
                               noise_samples=2, noise_ratio=0.05, seed=3)
    assert max(len(u) for u, _ in got.values()) >= 3 and any(f for _, f in got.values())
    assert len(search._dense.order) == 2 and search._dense.first is not None   # bounded rows, cached first layer
    assert search._stacked.usable is (not norm)
    head = search.structure.spaces[-2]
    chosen = np.concatenate([u for u, _ in got.values()])
    assert ((chosen >= head.offset) & (chosen < head.offset + head.size)).any()   # bounded-row items won


class _Twice(nn.Module):
    """A dense model applying one linear layer twice per forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(300, 64), nn.Linear(64, 64), nn.Linear(64, 5)

    def forward(self, x):
        return self.out(self.mid(self.mid(self.inp(x.flatten(1)).relu()).relu()).relu())


class _SharedInConvNet(nn.Module):
    """A conv net applying one linear layer twice per forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = F.max_pool2d(self.conv(x).relu(), 4).flatten(1)
        return self.out(self.fc(self.fc(h).relu()).relu())


@pytest.mark.parametrize("make, shape", [(_Twice, (30, 3, 10, 10)), (_SharedInConvNet, (40, 1, 8, 8))])
def test_linear_layer_called_twice_equals_official_rule(make, shape):
    """A linear layer applied twice per forward (shared weights) breaks the bookkeeping of the stacked
    group (dense models) and of the shared-weight linear layers (conv nets): the construction checks
    see it (one search at a time / every weight masked) and the items stay the official loop's."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    with torch.no_grad():
        y = model(x).argmax(1)
    refs = np.arange(10, 26)[None]
    r = torch.as_tensor(refs)
    got, search = _check_equal(model, x[:4], y[:4], np.arange(4), x[r], y[r], refs, group_size=3, max_units=10)
    assert max(len(u) for u, _ in got.values()) >= 2
    assert not (search._batched.linears if search.batched else search._stacked.usable)


def test_conv_net_linear_layers_run_with_shared_weights():
    model, x = _conv_bn()
    with torch.no_grad():
        y = model(x).argmax(1)
    assert set(weights.WeightFlipSearch(model, x[None, :4], y[None, :4], np.arange(4)[None])._batched.linears) == {"9"}


def test_weight_site_loop_fallback_is_recorded(monkeypatch, tmp_path):
    """When vmap cannot batch a conv net's layers, the searches run one at a time (the same items) and the
    result's config, the log, the command's summary and the report say so, with the reason."""
    model, x = _conv_bn()
    with torch.no_grad():
        data = make_data(x, model(x).argmax(1))
    kw = dict(examples="clean:3", site="weight", repeats=1, ref_batch_size=8, max_units=6, device="cpu")
    batched = flip.flip(model, data, **kw)
    assert (batched.config["weight_site_path"], batched.config["weight_site_fallback"]) == ("vmap", None)

    def refuse(*a, **k):
        raise RuntimeError("no batching rule for this layer\n(second line)")
    monkeypatch.setattr(importlib.import_module("memloc.analyses.flip.batched"), "vmap", refuse)
    logged = []
    looped = flip.flip(model, data, log=logged.append, **kw)
    assert looped.config["weight_site_path"] == "loop"
    assert looped.config["weight_site_fallback"] == "RuntimeError: no batching rule for this layer"
    assert np.array_equal(looped["unit_ids"].values, batched["unit_ids"].values) and len(batched["unit_ids"]) > 0
    assert "one search at a time" in logged[-1] and "no batching rule" in logged[-1]
    assert "one search at a time" in flip._cli_summary(looped, None)
    assert "one search at a time" not in flip._cli_summary(batched, None)
    assert "no batching rule" in flip.plot_flip(looped, tmp_path)
