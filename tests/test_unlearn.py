"""Importance maps (Fisher, MAS) and unlearning: known answers against loops, scope, errors."""
import copy
import importlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memloc
from memloc.cli import run as cli_run
from memloc.core.data import ExampleSet
from memloc.analyses.importance import layer_importance, param_importance, unit_importance
from memloc.core.units import trace
from conftest import forward_dtypes, results_free_copy
from memloc.core.precision import grad_scaler
from memloc.actions.unlearn import _zero_context, distillation_loss, finetune, quadratic_penalty

TINY = {"dataset": "digits", "model": "mlp", "epochs": 20, "batch_size": 64, "lr": 0.1, "noise": 0.2}  # memorises 69%


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()


def _loop(model, x, y, method):
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad()
        z = model(x[i:i + 1])
        loss = F.cross_entropy(z, y[i:i + 1]) if method == "fisher" else z.pow(2).sum()
        loss.backward()
        for k, p in model.named_parameters():
            out[k] += p.grad.pow(2) if method == "fisher" else p.grad.abs()
    return {k: v / len(y) for k, v in out.items()}


@pytest.mark.parametrize("method", ["fisher", "mas"])
def test_importance_equals_its_definition_by_a_loop(method):
    model = _tiny_model()
    x, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 3, (13,))
    fast = param_importance(model, x, y, method=method, batch_size=5)
    slow = _loop(model, x, y, method)
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-10, atol=1e-14), k


@pytest.mark.parametrize("method", ["fisher", "mas"])
def test_importance_of_linear_models_by_outer_products_equals_the_loop(method):
    """A model of Linear layers takes the outer-product path (no per-example gradients); a conv, a reused
    layer or (B, T, in) inputs take torch.func's: both equal the loop's definition in float64."""
    from memloc.analyses import importance as imp_mod
    dense = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 3, (11,))
    with torch.no_grad():
        params = {k: p.detach() for k, p in dense.named_parameters()}
        assert imp_mod._linear_importance(dense, params, x, y, method, 4) is not None
    fast, slow = param_importance(dense, x, y, method=method, batch_size=4), _loop(dense, x, y, method)
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-10, atol=1e-14), k
    shared = nn.Linear(6, 6).double()
    tied = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 3)).double()
    tied[2].weight = tied[0].weight

    class Scaled(nn.Linear):            # a subclass with its own forward: not the outer-product rule
        def forward(self, a):
            return 2 * super().forward(a)

    others = {"reused": nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(6, 3)).double(),
              "tied": tied,
              "in place": nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double(),
              "subclass": nn.Sequential(Scaled(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()}
    for what, model in others.items():       # each takes torch.func's path
        params = {k: p.detach() for k, p in model.named_parameters()}
        assert imp_mod._linear_importance(model, params, x, y, method, 4) is None, what
        fast, slow = param_importance(model, x, y, method=method, batch_size=4), _loop(model, x, y, method)
        for k in slow:
            assert torch.allclose(fast[k], slow[k], rtol=1e-10, atol=1e-14), (what, k)


def test_layer_and_unit_aggregation():
    model = _tiny_model()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    imp = param_importance(model, x, y)
    structure = trace(model, x[:2])
    per_layer = layer_importance(imp, structure)
    first = structure.layers[0]
    assert per_layer[0] == pytest.approx(float(sum(imp[k].sum() for k in first.params) / first.numel))
    units = unit_importance(imp, model, structure)
    w, b = imp["1.weight"], imp["1.bias"]
    assert units[:4] == pytest.approx(((w.sum(1) + b) / 7).numpy())       # weight row (6) + bias (1)
    assert len(units) == structure.n_units


def test_penalties_and_distillation_equal_hand_computation():
    model = _tiny_model()
    anchor = {k: p.detach() + 0.1 for k, p in model.named_parameters()}
    weight = {k: torch.full_like(p, 2.0) for k, p in model.named_parameters()}
    n = sum(p.numel() for p in model.parameters())
    assert float(quadratic_penalty(model, anchor, weight, 3.0).detach()) == pytest.approx(0.5 * 3.0 * 2.0 * 0.01 * n)
    new, old = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 1.0, 3.0]])
    p = torch.softmax(old / 2, 1)
    q = torch.softmax(new / 2, 1)
    assert float(distillation_loss(new, old, 2.0)) == pytest.approx(float(4 * (p * (p / q).log()).sum()), rel=1e-6)


def test_a_large_penalty_keeps_the_parameters_put():
    model = _tiny_model().float()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    data = ExampleSet(x, y, torch.arange(64))
    anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
    ones = {k: torch.ones_like(p) for k, p in model.named_parameters()}

    def moved(lam):
        m = finetune(copy.deepcopy(model), data, epochs=5, lr=1e-2, momentum=0.0, batch_size=8,
                     extra=lambda mod, _x, _z: quadratic_penalty(mod, anchor, ones, lam))
        return max(float((p - anchor[k]).detach().abs().max()) for k, p in m.named_parameters())

    free, held = moved(0.0), moved(100.0)      # lr x lambda = 1: each step pulls all the way back
    assert held < 0.1 * free


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    run = memloc.train(tmp_path_factory.mktemp("ul") / "small", TINY, device="cpu")
    memloc.flip(run, examples="noisy:20,clean:5", device="cpu").save(run.results_path("flip"))
    return run


def test_zeroing_touches_exactly_the_forget_sets_flip_units(small):
    run = memloc.load(small.path)
    data, model = run.data(), run.model()
    flip = run.result("flip")
    forget = np.flatnonzero(run.is_noisy)
    ctx, units = _zero_context(run, model, data, forget)
    reps, ids, off = flip.sizes["repeat"], flip["unit_ids"].values, flip["unit_offsets"].values
    rows = [i for i, e in enumerate(flip["example"].values) if run.is_noisy[e] and flip["status"].values[i] == 0]
    spans = [ids[off[i * reps + r]:off[i * reps + r + 1]] for i in rows for r in range(reps) if flip["flipped"].values[i, r]]
    assert all(len(sp) == flip["n_units"].values[i, r] for sp, (i, r) in
               zip(spans, [(i, r) for i in rows for r in range(reps) if flip["flipped"].values[i, r]]))
    expect = np.unique(np.concatenate(spans))
    assert np.array_equal(units, expect)
    structure = trace(model, data.train.x[:2])
    space = structure.spaces[0]
    module = dict(model.named_modules())[space.module]

    def activation(masked):
        acts = {}
        with ctx() if masked else torch.no_grad():   # registered after the mask's hook: sees the masked output
            hook = module.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
            try:
                model(data.train.x[:8])
            finally:
                hook.remove()
        return acts["a"]

    masked, plain = activation(True), activation(False)
    zeroed = torch.from_numpy(np.isin(np.arange(space.size) + space.offset, units))
    assert zeroed.any() and torch.all(masked[:, zeroed] == 0)
    assert torch.equal(masked[:, ~zeroed], plain[:, ~zeroed])        # every other unit untouched


def test_unlearn_result_and_cli(small, capsys):
    res = memloc.unlearn(small, methods="finetune,ewc,lwf,ascent,zero,retrain_layer", seeds=[0, 1], epochs=1,
                         retrain_epochs=2, device="cpu")
    run = memloc.load(small.path)
    assert res["accuracy"].shape == (6, 2, 4) and np.array_equal(res["forget"].values, np.flatnonzero(run.is_noisy))
    final = run.metrics()
    assert float(res["baseline"].sel(group="forget_given")) == pytest.approx(final["noisy_accuracy"][-1])
    assert float(res["baseline"].sel(group="test")) == pytest.approx(final["test_accuracy"][-1])
    assert np.all((res["accuracy"].values >= 0) & (res["accuracy"].values <= 1))
    z = res["accuracy"].sel(technique="zero").values
    assert np.array_equal(z[0], z[1])                                    # deterministic: no seed involved
    assert res["passes"].sel(technique="zero") == 0 and res["seconds"].values.min() >= 0
    cli_run("unlearn", [str(small.path), "--method", "finetune", "--seeds", "0", "--epochs", "1", "--device", "cpu"])
    assert "forget_given" in capsys.readouterr().out and run.results_path("unlearn").is_file()


def test_retrain_layer_says_which_layer_and_why(small, tmp_path, capsys):
    """Without a retrain result the first layer is retrained with a warning (it used to be silent);
    with one, the layer whose retraining left the fewest noisy labels. Either way the choice is in
    the result's config, the command's summary and the report."""
    run = results_free_copy(small, tmp_path / "run")
    kw = dict(methods="retrain_layer", seeds=[0], retrain_epochs=1, device="cpu")
    with pytest.warns(UserWarning, match="no usable results/retrain.h5 .* so the first layer"):
        res = memloc.unlearn(run, **kw)
    first = trace(run.model(), run.data().train.x[:2]).layers[0].name
    assert res.config["retrain_layer"] == {"layer": first, "chosen_by": "the first layer (no retrain result: run "
                                                                        "memloc retrain first)"}
    rt = memloc.retrain(run, epochs=1, device="cpu", save=True)
    acc = rt["accuracy"].sel(subset="noisy").isel(epoch=-1).values
    best = str(rt["layer"].values[int(np.nanargmin(acc))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli_run("unlearn", [str(run.path), "--method", "retrain_layer", "--seeds", "0", "--retrain-epochs", "1",
                            "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"retrain_layer retrained {best!r}: results/retrain.h5: its retraining left the fewest noisy labels" in out
    assert run.result("unlearn").config["retrain_layer"]["layer"] == best
    md = memloc.report(run, tmp_path / "rep").read_text()
    assert f"retrain_layer retrained {best!r}" in md
    from memloc.reporting.summary import _fixing            # the findings at the top name the layer too
    res = run.result("unlearn")
    res["baseline"].loc[{"group": "test"}] = 0.0            # retrain_layer the best within a point of it
    assert f"Its layer, `{best}`: results/retrain.h5" in " ".join(_fixing({"unlearn": res}))


def test_unlearn_and_importance_refuse_bad_input(small, tmp_path, capsys):
    bare = memloc.train(tmp_path / "bare", {**TINY, "epochs": 1}, device="cpu")
    cases = [("unlearn", [small.path, "--forget", "ids:"], "empty"),
             ("unlearn", [small.path, "--forget", "ids:99999"], "outside"),
             ("unlearn", [small.path, "--method", "magic"], "--method"),
             ("unlearn", [small.path, "--lambda", "-1"], "--lambda"),
             ("unlearn", [small.path, "--forget", "flagged"], "memloc issues"),
             ("unlearn", [bare.path, "--method", "zero"], "flip"),
             ("importance", [small.path, "--subsets", "weird"], "--subsets")]
    for name, argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            cli_run(name, [str(a) for a in argv] + ["--device", "cpu", "--overwrite"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
    assert not bare.results_path("unlearn").exists()


def test_importance_on_a_run(small):
    res = memloc.importance(small, subsets="clean,noisy,class:3", device="cpu")
    run = memloc.load(small.path)
    assert list(res["subset"].values) == ["clean", "noisy", "class:3"]
    assert int(res["examples"].sel(subset="noisy")) == run.is_noisy.sum()
    assert int(res["examples"].sel(subset="class:3")) == (run.label_given == 3).sum()
    assert "flip_overlap" in res and 0 <= float(res["flip_overlap"]) <= 1
    # noisy (memorised) examples have larger loss gradients than fitted clean ones
    assert np.all(res["layer_importance"].sel(subset="noisy").values > res["layer_importance"].sel(subset="clean").values)


def test_forgetting_order_splits_and_phases(small, capsys):
    from memloc.actions.forgetting import split_parts
    from memloc.analyses.scores import forgetting_events
    run = memloc.load(small.path)
    a, b = split_parts(run, "random")
    assert len(np.intersect1d(a, b)) == 0 and np.array_equal(np.union1d(a, b), np.arange(run.num_train))
    counts = forgetting_events(run.dynamics("correct", "presentation")[1:])
    f, u = split_parts(run, "forgettable_first")
    assert len(f) == len(u) and np.all(counts[f] > 0) and np.all(counts[u] == 0)
    u2, f2 = split_parts(run, "unforgettable_first")
    assert np.array_equal(u2, u) and np.array_equal(f2, f)
    res = memloc.forgetting_order(small, orders="random,forgettable_first", protect="none,ewc,lwf", epochs=2,
                                  device="cpu")
    assert res["accuracy"].shape == (2, 3, 5, 2) and list(res["size"].sel(order="random").values) == [len(a), len(b)]
    acc = res["accuracy"].values
    assert np.array_equal(acc[:, 0, :3], acc[:, 1, :3]) and np.array_equal(acc[:, 0, :3], acc[:, 2, :3])  # phase 1 shared
    assert not np.array_equal(acc[:, 0, 3:], acc[:, 1, 3:])                                               # protection acts
    for argv, needle in [(["--orders", "sideways"], "--orders"), (["--protect", "magic"], "--protect")]:
        with pytest.raises(SystemExit) as e:
            cli_run("forgetting-order", [str(small.path), *argv, "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_etd_drop_equals_the_dropout_analysis_and_needs_dropout_layers(small, tmp_path, capsys):
    etd = memloc.train(tmp_path / "etd", {**TINY, "epochs": 4, "etd_after": "act1,act2", "p_gen": 0.4, "p_mem": 0.2},
                       device="cpu")
    res = memloc.unlearn(etd, seeds=[0], epochs=1, retrain_epochs=1, device="cpu")
    assert "etd_drop" in res["technique"].values and "zero" not in res["technique"].values     # no flip result
    drop = memloc.evaluate_dropout(etd, device="cpu")["accuracy"].sel(mode="drop")
    got = res["accuracy"].sel(technique="etd_drop", seed=0)
    assert float(got.sel(group="forget_given")) == pytest.approx(float(drop.sel(subset="noisy")))
    assert float(got.sel(group="test")) == pytest.approx(float(drop.sel(subset="test")))
    fo = memloc.forgetting_order(etd, orders="random", protect="none,lwf", epochs=1, device="cpu")   # no ids needed
    assert fo["accuracy"].shape == (1, 2, 3, 2)
    with pytest.raises(SystemExit) as e:
        cli_run("unlearn", [str(small.path), "--method", "etd_drop", "--device", "cpu", "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "example-tied dropout" in err and len(err.strip().splitlines()) == 1


def test_unlearning_in_bf16_close_to_fp32_and_fp16_fine_tuning_scales_the_loss(small, monkeypatch):
    kw = {"forget": "noisy", "methods": "finetune", "seeds": [0], "epochs": 1, "device": "cpu"}
    a = memloc.unlearn(small, **kw)
    with forward_dtypes() as seen:
        b = memloc.unlearn(small, precision="bf16", **kw)
    assert torch.bfloat16 in seen and (a.config["precision"], b.config["precision"]) == ("fp32", "bf16")
    np.testing.assert_allclose(b["baseline"].values, a["baseline"].values, atol=0.02)
    np.testing.assert_allclose(b["accuracy"].values, a["accuracy"].values, atol=0.05)
    # fp16: the fine-tuning steps go through the loss scaler (each successful step counts towards its growth)
    model, part = small.model(), small.data().train.subset(np.arange(256))
    plain = finetune(copy.deepcopy(model), part, epochs=1, lr=0.01)
    scaler = grad_scaler("fp16", "cpu")
    half = finetune(copy.deepcopy(model), part, epochs=1, lr=0.01, precision="fp16", scaler=scaler)
    assert scaler.state_dict()["_growth_tracker"] == 2            # 256 examples: two steps of 128
    for (k, v), w in zip(plain.state_dict().items(), half.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=0.01, atol=0.01, msg=k)
    # forgetting_order: its evaluations in bf16, and every phase's fine-tuning asked for bf16 with one scaler
    calls = []
    monkeypatch.setattr(importlib.import_module("memloc.actions.forgetting"), "finetune",
                        lambda model, *args, **kw: calls.append((kw["precision"], kw["scaler"])) or model)
    with forward_dtypes() as seen:
        f = memloc.forgetting_order(small, orders="random", protect="none,lwf", epochs=1, device="cpu", precision="bf16")
    assert torch.bfloat16 in seen and f.config["precision"] == "bf16" and len(calls) == 3
    assert {p for p, _ in calls} == {"bf16"} and len({id(s) for _, s in calls}) == 3    # phase 1, and each phase 2
