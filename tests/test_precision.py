"""--precision (autocast) and channels_last (memloc.core.precision): fp32 is today's computation bit for bit
and keeps run identities; bf16 on the CPU trains, rewinds, retrains, scores and flips a small conv net
with results close to fp32's; fp16 scales the loss and resumes exactly; errors; channels_last equals
contiguous within float tolerance. CUDA paths are checked only where a GPU exists."""
import copy
import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memloc
from memloc.core import registry
from memloc.cli import run as cli_run
from memloc.cli.runner import parser as command_parser
from memloc.actions.children import _digest, child_path
from memloc.core.precision import (PRECISIONS, apply_channels_last, autocast, check_precision, grad_scaler,
                              to_channels_last, use_channels_last)
from memloc.analyses.importance import param_importance
from memloc.analyses.retrain import retrain_layer
from memloc.core.selection import prepare
from memloc.training.train import resolve_config, train
from conftest import forward_dtypes, train_interrupted, needs_cuda


@memloc.register_model("precision_tinyconv")
class TinyConv(nn.Module):
    """conv-BN-ReLU-pool, conv-BN-ReLU, global pool, linear: a conv net with norms, fast on 8x8 digits."""

    def __init__(self, in_shape, num_classes: int):
        super().__init__()
        c = in_shape[0]
        self.features = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


CONV = {"dataset": "digits", "model": "precision_tinyconv", "epochs": 4, "batch_size": 64, "lr": 0.1}
MLP = {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 64, "lr": 0.1, "train_size": 600}
CUDA = needs_cuda()


def _same_runs(a, b):
    """Equal weights at every checkpoint and equal recorded dynamics and metrics."""
    assert a.epochs == b.epochs
    assert all(torch.equal(t, b.checkpoint(e)[k]) for e in a.epochs for k, t in a.checkpoint(e).items())
    for when in ("presentation", "end"):
        for name in ("loss", "correct", "margin"):
            np.testing.assert_array_equal(a.dynamics(name, when), b.dynamics(name, when))
    for k, v in a.metrics().items():
        np.testing.assert_array_equal(v, b.metrics()[k])


@pytest.fixture(scope="module")
def conv_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return {p: train(root / p, {**CONV, "precision": p}, device="cpu") for p in ("fp32", "bf16")}


# ----------------------------------------------------------------------------- the module
def test_names_contexts_and_scaler():
    assert list(PRECISIONS) == ["fp32", "bf16", "fp16"]
    assert check_precision("bf16", "cpu") == "bf16"
    for bad in ("fp8", "float32", None, 16):
        with pytest.raises(memloc.MemlocError, match=r"^precision .* is unknown; valid: fp32, bf16, fp16"):
            check_precision(bad)
    with pytest.raises(memloc.MemlocError, match="^precision 'half' is unknown"):
        resolve_config({"precision": "half"})
    with pytest.warns(UserWarning, match="fp16 on the CPU"):
        check_precision("fp16", "cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert [grad_scaler(p, "cpu").is_enabled() for p in PRECISIONS] == [False, False, True]


def test_every_command_takes_precision(capsys):
    """train, and the command of every analysis whose function takes ``precision``."""
    names = ["train"] + [a.command.name for a in map(registry.analysis, registry.analyses())
                         if a.command is not None and "precision" in inspect.signature(a.compute).parameters]
    assert {"retrain", "rewind", "flip", "scores", "issues", "importance", "dropout", "prune", "clean", "jtt",
            "unlearn", "forgetting-order", "localise-neurons"} <= set(names)
    for name in names:
        assert name in registry.commands()
        action = next(a for a in command_parser(registry.command(name))._actions if a.dest == "precision")
        assert (action.default, list(action.choices)) == ("fp32", ["fp32", "bf16", "fp16"]), name
    with pytest.raises(SystemExit) as e:
        cli_run("rewind", ["nowhere", "--precision", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fp32: nothing changes
def test_fp32_training_is_unchanged_and_keeps_its_identity(tmp_path):
    base = train(tmp_path / "base", MLP, device="cpu")
    _same_runs(base, train(tmp_path / "fp32", {**MLP, "precision": "fp32"}, device="cpu"))
    assert base.config["precision"] == "fp32"
    assert "scaler" not in torch.load(base.path / "checkpoints" / "trainer_state.pt", weights_only=True)
    # the config hash of a default config is the one computed before the option existed
    assert _digest(resolve_config({})) == _digest(resolve_config({"precision": "fp32"})) == "46a3ab3d90"
    assert _digest(resolve_config({"precision": "bf16"})) != _digest(resolve_config({}))


# ----------------------------------------------------------------------------- bf16 on the CPU
def test_bf16_training_is_close_to_fp32_not_equal(conv_runs):
    a, b = conv_runs["fp32"], conv_runs["bf16"]
    assert (a.config["precision"], b.config["precision"]) == ("fp32", "bf16")
    wa, wb = a.checkpoint(a.final_epoch), b.checkpoint(b.final_epoch)
    assert all(torch.isfinite(t).all() for t in wb.values() if t.is_floating_point())
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = a.metrics(), b.metrics()
    assert ma["test_accuracy"][-1] > 0.5
    for k in ("train_accuracy", "test_accuracy"):
        assert abs(ma[k][-1] - mb[k][-1]) < 0.05, k
    assert np.isfinite(b.dynamics("loss", "end")).all() and np.isfinite(b.dynamics("loss", "presentation")[1:]).all()


def test_bf16_rewind_retrain_scores_close_to_fp32(conv_runs, tmp_path):
    run = conv_runs["bf16"]
    # rewind: a stale 16-bit weight cache would keep the final weights in every rewound pass (0.3 apart)
    acc = {p: memloc.rewind(run, checkpoints="0", device="cpu", precision=p) for p in ("fp32", "bf16")}
    assert acc["bf16"].config["precision"] == "bf16" and acc["fp32"].config["precision"] == "fp32"
    np.testing.assert_allclose(acc["bf16"]["accuracy"].values, acc["fp32"]["accuracy"].values, atol=0.05)
    np.testing.assert_allclose(acc["bf16"]["baseline"].values, acc["fp32"]["baseline"].values, atol=0.02)
    # retrain: the layer's retrained weights are close, not equal
    p = prepare(run, device="cpu", layers="head", checkpoints="final")
    curves, models = {}, {}
    for prec in ("fp32", "bf16"):
        curves[prec], models[prec] = retrain_layer(p.model, run.checkpoint(0), p.layers[0], p.data, epochs=1,
                                                   precision=prec)
    wa, wb = models["fp32"].head.weight, models["bf16"].head.weight
    assert torch.isfinite(wb).all() and not torch.equal(wa, wb)
    torch.testing.assert_close(wb, wa, rtol=0.1, atol=0.05)
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], atol=0.05)
    res = memloc.retrain(run, layers="head", epochs=1, device="cpu", precision="bf16")
    assert res.config["precision"] == "bf16"
    # scores: el2n's forward in bf16 (close, not equal); grand's gradient norms stay fp32 (equal)
    s = {prec: memloc.scores(run, methods="el2n,grand,final_loss", device="cpu", precision=prec)
         for prec in ("fp32", "bf16")}
    assert s["bf16"].config["precision"] == "bf16"
    e32, e16 = s["fp32"]["el2n"].values, s["bf16"]["el2n"].values
    assert np.isfinite(e16).all() and not np.array_equal(e32, e16)
    np.testing.assert_allclose(e16, e32, atol=0.05)
    np.testing.assert_array_equal(s["bf16"]["grand"].values, s["fp32"]["grand"].values)
    np.testing.assert_array_equal(s["bf16"]["final_loss"].values, s["fp32"]["final_loss"].values)
    saved = memloc.load_result(s["bf16"].save(tmp_path / "scores.h5"))
    assert saved.config["precision"] == "bf16"


def test_flip_precision_and_its_errors(conv_runs, capsys):
    run = conv_runs["bf16"]
    with pytest.raises(memloc.MemlocError, match=r"^precision bf16 \(autocast to 16 bits\) and dtype float64"):
        memloc.flip(run, examples="noisy:2", dtype="float64", precision="bf16", device="cpu", resume=None)
    with pytest.raises(memloc.MemlocError, match="^precision 'x' is unknown"):
        memloc.flip(run, examples="noisy:2", precision="x", device="cpu", resume=None)
    with pytest.raises(SystemExit) as e:
        cli_run("flip", [str(run.path), "--precision", "bf16", "--dtype", "float64", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("memloc flip: error: --precision bf16")
    res = {p: memloc.flip(run, examples="noisy:3,clean:3", max_units=20, precision=p, device="cpu", resume=None)
           for p in ("fp32", "bf16")}
    assert res["bf16"].config["precision"] == "bf16" and res["fp32"].config["precision"] == "fp32"
    np.testing.assert_array_equal(res["bf16"]["status"].values, res["fp32"]["status"].values)
    assert (res["bf16"]["n_units"].values <= 20).all()


def test_rewind_command_saves_its_precision(conv_runs):
    run = conv_runs["bf16"]
    res = cli_run("rewind", [str(run.path), "--checkpoints", "0", "--layers", "head", "--precision", "bf16",
                             "--device", "cpu", "--overwrite"])
    assert res.config["precision"] == "bf16" and run.result("rewind").config["precision"] == "bf16"


# ----------------------------------------------------------------------------- fp16: the loss scaler
def test_fp16_scales_the_loss_and_resumes_bit_identically(tmp_path):
    cfg = {**MLP, "precision": "fp16"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # fp16 on the CPU is slow: warned, not refused
        full = train(tmp_path / "full", cfg, device="cpu")
        train_interrupted(tmp_path / "cut", cfg, device="cpu")
        state = torch.load(tmp_path / "cut" / "checkpoints" / "trainer_state.pt", weights_only=True)
        assert state["scaler"]["scale"] > 0
        _same_runs(full, train(tmp_path / "cut", cfg, device="cpu", resume=True))
    assert np.isfinite(full.dynamics("loss", "end")).all() and full.metrics()["test_accuracy"][-1] > 0.5


# ----------------------------------------------------------------------------- channels_last
def test_channels_last_equals_contiguous():
    torch.manual_seed(0)
    for model in (TinyConv((1, 8, 8), 10), memloc.core.models.build_model("resnet9", (3, 16, 16), 10, width=4)):
        x = torch.randn(6, *([1, 8, 8] if isinstance(model, TinyConv) else [3, 16, 16]))
        y = torch.arange(6) % 10
        fast = to_channels_last(copy.deepcopy(model))
        conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dim() == 4
        xl = to_channels_last(x)
        assert xl.is_contiguous(memory_format=torch.channels_last) and torch.equal(xl, x)
        out, out_l = model(x), fast(xl)
        torch.testing.assert_close(out_l, out, rtol=1e-5, atol=1e-5)
        F.cross_entropy(out, y).backward()
        F.cross_entropy(out_l, y).backward()
        for (k, p), q in zip(model.named_parameters(), fast.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=k)
    mlp, v = nn.Linear(4, 2), torch.randn(3, 4)
    assert to_channels_last(mlp) is mlp and to_channels_last(v) is v
    # the rule: CUDA, 16 bits, a 2-d convolution (decided without a GPU)
    conv_net = TinyConv((1, 8, 8), 10)
    assert use_channels_last(conv_net, "bf16", "cuda") and use_channels_last(conv_net, "fp16", "cuda:0")
    assert not use_channels_last(conv_net, "fp32", "cuda") and not use_channels_last(conv_net, "bf16", "cpu")
    assert not use_channels_last(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "bf16", "cuda")
    assert not apply_channels_last(conv_net, "bf16", "cpu")
    assert conv_net.features[0].weight.is_contiguous()


def test_channels_last_paths_match_contiguous(tmp_path, monkeypatch):
    """The CUDA-only layout forced on the CPU (in fp32): training, rewinding and flip searches run on
    channels_last models and inputs and agree with the contiguous computation within float tolerance."""
    cfg = {**CONV, "epochs": 1}
    plain = train(tmp_path / "plain", cfg, device="cpu")
    rewound = memloc.rewind(plain, checkpoints="0", device="cpu")
    flipped = memloc.flip(plain, examples="clean:3", max_units=5, site="weight", device="cpu", resume=None)
    monkeypatch.setattr(importlib.import_module("memloc.core.precision"), "use_channels_last",
                        lambda model, precision, device: any(isinstance(m, nn.Conv2d) for m in model.modules()))
    fast = train(tmp_path / "fast", cfg, device="cpu")
    for k, t in plain.checkpoint(1).items():
        torch.testing.assert_close(fast.checkpoint(1)[k].contiguous(), t, rtol=1e-3, atol=1e-4, msg=k)
    np.testing.assert_allclose(fast.dynamics("loss", "end"), plain.dynamics("loss", "end"), rtol=1e-3, atol=1e-4)
    assert fast.model(1)(fast.data().train.x[:2]).shape == (2, 10)     # its checkpoints load as usual
    np.testing.assert_allclose(memloc.rewind(plain, checkpoints="0", device="cpu")["accuracy"].values,
                               rewound["accuracy"].values, atol=0.01)
    again = memloc.flip(plain, examples="clean:3", max_units=5, site="weight", device="cpu", resume=None)
    np.testing.assert_array_equal(again["status"].values, flipped["status"].values)


def test_the_newer_analyses_lay_conv_nets_out_channels_last_too(conv_runs, monkeypatch):
    """The CUDA-only layout forced on the CPU: issues, importance and scores (el2n) run channels_last conv nets
    (memloc.core.precision.laid_out) and agree with the contiguous computation within float tolerance."""
    run = conv_runs["fp32"]
    calls = {"find_label_issues": (lambda: memloc.find_label_issues(run, device="cpu"), "prob_given"),
             "importance": (lambda: memloc.importance(run, subsets=[f"ids:{i}" for i in range(8)], device="cpu"),
                            "layer_importance"),
             "scores": (lambda: memloc.scores(run, methods="el2n", device="cpu"), "el2n")}
    plain = {name: call()[v].values for name, (call, v) in calls.items()}
    seen = []

    def forced(model, precision, device):
        seen.append(model)
        return any(isinstance(m, nn.Conv2d) for m in model.modules())
    monkeypatch.setattr(importlib.import_module("memloc.core.precision"), "use_channels_last", forced)
    for name, (call, v) in calls.items():
        seen.clear()
        got = call()[v].values
        convs = [m for model in seen for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs), name
        np.testing.assert_allclose(got, plain[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_bf16_label_issues_and_importance_close_to_fp32(conv_runs):
    run = conv_runs["fp32"]
    issues = {p: memloc.find_label_issues(run, device="cpu", precision=p) for p in ("fp32", "bf16")}
    a, b = issues["fp32"], issues["bf16"]
    assert (a.config["precision"], b.config["precision"]) == ("fp32", "bf16")
    assert not np.array_equal(a["prob_given"].values, b["prob_given"].values)       # autocast was at work
    np.testing.assert_allclose(b["prob_given"].values, a["prob_given"].values, atol=0.02)
    assert abs(float(a["rate_estimate"]) - float(b["rate_estimate"])) < 0.01
    fa, fb = (r["flagged"].values.astype(bool) for r in (a, b))
    assert (fa & fb).sum() / (fa | fb).sum() > 0.95
    # per-example gradients of a conv net with batch norms (vmap; the norms' inputs cast back to float32)
    model, train_set = run.model(), run.data().train
    imp = {p: param_importance(model, train_set.x[:16], train_set.y[:16], precision=p) for p in ("fp32", "bf16")}
    for k, v in imp["fp32"].items():
        w = imp["bf16"][k]
        assert w.dtype == v.dtype == torch.float32 and not torch.equal(w, v), k
        torch.testing.assert_close(w, v, rtol=0.1, atol=0.1 * float(v.abs().max()), msg=k)


def test_every_analysis_refuses_an_unknown_precision_before_any_work(conv_runs):
    for name in ("find_label_issues", "importance", "evaluate_dropout", "prune", "clean", "jtt", "unlearn",
                 "forgetting_order", "localise_neurons", "inj_benchmark", "del_benchmark"):
        with pytest.raises(memloc.MemlocError, match=r"^precision 'half' is unknown; valid: fp32, bf16, fp16$") as e:
            getattr(memloc, name)(conv_runs["fp32"], device="cpu", precision="half")
        assert e.value.argument == "precision", name


@pytest.mark.parametrize("command,module,function", [
    ("issues", "analyses.label_issues", "find_label_issues"), ("importance", "analyses.importance", "importance"),
    ("dropout", "analyses.etd", "evaluate_dropout"), ("prune", "actions.prune", "prune"),
    ("clean", "actions.clean", "clean"), ("jtt", "actions.jtt", "jtt"), ("unlearn", "actions.unlearn", "unlearn"),
    ("forgetting-order", "actions.forgetting", "forgetting_order"),
    ("localise-neurons", "analyses.localise", "localise_neurons")])
def test_commands_pass_precision_on(conv_runs, monkeypatch, capsys, command, module, function):
    got = []

    def capture(*args, **kwargs):
        got.append(kwargs.get("precision"))
        raise memloc.MemlocError("captured")
    monkeypatch.setattr(importlib.import_module(f"memloc.{module}"), function, capture)
    with pytest.raises(SystemExit):
        cli_run(command, [str(conv_runs["fp32"].path), "--device", "cpu", "--precision", "bf16"])
    assert got == ["bf16"] and "captured" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["prune", "clean", "jtt"])
def test_experiments_run_their_own_passes_in_precision_and_train_the_parents_recipe(conv_runs, monkeypatch, action):
    """prune / clean / jtt score, flag and evaluate in ``precision``; their fresh runs keep the parent's recipe,
    its precision included, whatever ``precision`` is."""
    run = conv_runs["fp32"]
    asked = []

    def children_are_the_parent(parent, children, **kw):     # what the experiment would train, and no training
        asked.append([cfg for _, cfg in children])
        return [parent] * len(children)
    monkeypatch.setattr(importlib.import_module(f"memloc.actions.{action}"), "train_children", children_are_the_parent)
    kw = {"prune": {"methods": ["el2n"], "keep": [0.5]}, "clean": {"baseline": False}, "jtt": {}}[action]
    got = {}
    for precision in ("fp32", "bf16"):
        with forward_dtypes() as seen:
            got[precision] = getattr(memloc, action)(run, seeds=[0], device="cpu", precision=precision, **kw)
        assert (torch.bfloat16 in seen) == (precision == "bf16") and got[precision].config["precision"] == precision
    assert {c["precision"] for cfgs in asked for c in cfgs} == {run.config["precision"]}
    assert all(run.path in [child_path(run, "all", c) for c in cfgs] for cfgs in asked)   # the parent's own recipe
    if action == "jtt":     # the same error set and children; the group accuracies within two examples of a class
        assert asked[0] == asked[1]
        np.testing.assert_allclose(got["bf16"]["accuracy"].values, got["fp32"]["accuracy"].values, atol=0.06)


# ----------------------------------------------------------------------------- CUDA only
@CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_16_bit_training_uses_channels_last_and_stays_close(tmp_path, precision):
    seen = []
    a = train(tmp_path / "fp32", CONV, device="cuda")
    b = train(tmp_path / precision, {**CONV, "precision": precision}, device="cuda",
              prepare_model=lambda model, cfg: seen.append(model))
    assert seen[0].features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert abs(a.metrics()["test_accuracy"][-1] - b.metrics()["test_accuracy"][-1]) < 0.05
    assert np.isfinite(b.dynamics("loss", "end")).all()
    if precision == "fp16":
        state = torch.load(b.path / "checkpoints" / "trainer_state.pt", weights_only=True)
        assert state["scaler"]["scale"] > 0
    acc = {p: memloc.rewind(b, checkpoints="0", device="cuda", precision=p)["accuracy"].values
           for p in ("fp32", precision)}
    np.testing.assert_allclose(acc[precision], acc["fp32"], atol=0.05)
    s = {p: memloc.scores(b, methods="el2n", device="cuda", precision=p)["el2n"].values for p in ("fp32", precision)}
    np.testing.assert_allclose(s[precision], s["fp32"], atol=0.05)
    f = memloc.flip(b, examples="noisy:2,clean:2", max_units=10, precision=precision, device="cuda", resume=None)
    assert f.config["precision"] == precision
