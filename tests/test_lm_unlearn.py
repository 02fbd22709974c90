"""Importance (Fisher, MAS) and unlearning on language-model runs (issue 23, item 5): the memorisation
targets as the forget set, suffix losses, memorised shares; exact against loops in float64."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memloc
from memloc.actions.continual import distillation_term, finetune
from memloc.analyses.importance import param_importance
from memloc.cli import run as cli_run
from memloc.core.lm import TinyGPT, hf_causal_lm, sequence_measures
from memloc.core.sequences import tinymem
from memloc.core.tasks import SequenceTask
from memloc.core.units import trace
from conftest import results_free_copy

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    return tinymem("mult", n_train=10, n_test=4, seq_len=16, suffix_len=4, noise=0.3)


def _model(kind: str, vocab: int):
    if kind == "gpt":
        return TinyGPT(vocab, n_layer=1, d_model=8, n_head=2, max_len=16, seed=0).double().eval()
    torch.manual_seed(0)
    return hf_causal_lm("gpt2", vocab, n_layer=1, d_model=8, n_head=2).double().eval()


def _logits(model, x):
    out = model(x) if isinstance(model, TinyGPT) else model(input_ids=x, use_cache=False).logits
    return out


def _loop(model, data, method):
    """The definition, one sequence at a time: the squared gradient of the suffix's log-likelihood (fisher)
    or the absolute gradient of the squared norm of the logits that predict the suffix (mas), averaged."""
    p, s = data.prefix_len, data.suffix_len
    out = {k: torch.zeros_like(q) for k, q in model.named_parameters()}
    for row in data.tokens:
        model.zero_grad()
        logits = _logits(model, row[None, :p + s - 1])[0, p - 1:]          # (s, V): predicts tokens p..p+s-1
        if method == "fisher":
            loss = -torch.log_softmax(logits, -1).gather(1, row[p:p + s, None]).sum()
        else:
            loss = logits.pow(2).sum()
        loss.backward()
        for k, q in model.named_parameters():
            out[k] += q.grad.pow(2) if method == "fisher" else q.grad.abs()
    return {k: v / len(data) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["gpt", "hf:gpt2"])
@pytest.mark.parametrize("method", ["fisher", "mas"])
def test_lm_importance_equals_its_definition_by_a_loop(kind, method):
    """Per parameter, float64: TinyGPT and a GPT-2 config (its head tied to the token embedding)."""
    data = _data()
    model = _model(kind, data.vocab_size)
    task = SequenceTask(data)
    fast = param_importance(model, task.train.x, task.train.y, method=method, batch_size=4, task=task)
    slow = _loop(model, data, method)
    assert fast.keys() == slow.keys()
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-10, atol=1e-15), k
    assert all(float(v.abs().sum()) > 0 for k, v in slow.items() if "pos" not in k and "wpe" not in k)


def test_lm_finetuning_steps_on_the_suffix_loss_and_distils_every_position():
    """One SGD step of finetune (no momentum, one batch) is theta - lr * grad of the mean suffix loss plus
    LwF's term, computed here by hand: KL of the T-softened logits of every position, mean over positions."""
    data = _data()
    model, task = _model("gpt", data.vocab_size), SequenceTask(data)
    teacher = copy.deepcopy(model)
    with torch.no_grad():                                   # a student away from its teacher
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    by_hand = copy.deepcopy(model)
    p, s, lr, lam, t = data.prefix_len, data.suffix_len, 0.1, 0.5, 2.0
    finetune(model, task.train, epochs=1, lr=lr, momentum=0.0, batch_size=len(data), task=task,
             extra=distillation_term(teacher, lam, t, task=task))
    x = data.tokens[:, :p + s - 1]
    new, old = _logits(by_hand.train(), x), _logits(teacher, x).detach()
    suffix = F.cross_entropy(new[:, p - 1:].reshape(-1, new.shape[-1]), data.tokens[:, p:p + s].reshape(-1))
    kl = (F.softmax(old / t, -1) * (F.log_softmax(old / t, -1) - F.log_softmax(new / t, -1))).sum(-1).mean()
    grads = torch.autograd.grad(suffix + lam * t * t * kl, list(by_hand.parameters()))
    for (k, q), g, (_, r) in zip(by_hand.named_parameters(), grads, model.named_parameters()):
        assert torch.allclose(r, q - lr * g, rtol=1e-9, atol=1e-12), k


def test_importance_on_a_language_model_run(memorising_lm, capsys):
    run, data = memorising_lm, memorising_lm.data()
    res = memloc.importance(run, method="fisher", device="cpu")
    layers = trace(run.model(), data.tokens[:2]).layers
    assert list(res["layer"].values) == [l.name for l in layers]
    assert list(res["examples"].values) == [int((~data.is_memorised_target).sum()), int(data.is_memorised_target.sum())]
    assert np.isfinite(res["layer_importance"].values).all() and (res["layer_importance"].values > 0).all()
    # a subset of sequences by id: the definition on exactly those rows
    one = memloc.importance(run, method="mas", subsets=["ids:3"], device="cpu")
    task = SequenceTask(data)
    rows = task.train.subset(np.array([3]))
    imp = param_importance(run.model(), rows.x, rows.y, method="mas", task=task)
    head = [l for l in layers if l.name == "head"][0]
    expected = sum(float(imp[k].sum()) for k in head.params) / sum(imp[k].numel() for k in head.params)
    assert float(one["layer_importance"].sel(subset="ids:3", layer="head")) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(SystemExit) as e:
        cli_run("importance", [str(run.path), "--subsets", "class:1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no classes" in err[0]


def test_unlearning_a_language_model_runs_targets(memorising_lm, tmp_path, capsys):
    run, data = memorising_lm, memorising_lm.data()
    res = memloc.unlearn(run, methods=["ascent", "ewc", "lwf"], seeds=(0,), ascent_lr=0.01, device="cpu")
    assert list(res["group"].values) == list(SequenceTask.groups)
    memorised = sequence_measures(run.model().eval(), data.tokens, data.prefix_len, data.suffix_len)["memorised"]
    base = res["baseline"]
    assert float(base.sel(group="forget_given")) == memorised[data.is_memorised_target].mean()
    assert float(base.sel(group="retain")) == memorised[~data.is_memorised_target].mean()
    assert sorted(res["forget"].values) == list(np.flatnonzero(data.is_memorised_target))
    # ascent on the targets' suffix loss makes the run reproduce fewer of them
    acc = res["accuracy"].sel(seed=0)
    assert float(acc.sel(technique="ascent", group="forget_given")) < float(base.sel(group="forget_given"))
    assert np.isfinite(acc.sel(group=["forget_given", "forget_true", "retain", "test", "test_rule"]).values).all()
    own = results_free_copy(run, tmp_path / "run")
    cli_run("unlearn", [str(own.path), "--method", "ascent", "--seeds", "0", "--device", "cpu"])
    assert "test_rule" in capsys.readouterr().out and own.results_path("unlearn").is_file()
    with pytest.raises(SystemExit) as e:
        cli_run("unlearn", [str(own.path), "--forget", "class:2", "--device", "cpu", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no classes" in err[0]
    # retrain_layer retrains the layer whose retraining left the fewest targets (results/retrain.h5)
    memloc.retrain(own, layers=["blocks.1.mlp.up", "head"], epochs=1, device="cpu", save=True)
    best = own.result("retrain")["accuracy"].sel(subset="noisy").isel(epoch=-1)
    rl = memloc.unlearn(own, methods=["retrain_layer"], seeds=(0,), retrain_epochs=1, device="cpu")
    assert rl.config["retrain_layer"]["layer"] == str(best["layer"].values[int(np.argmin(best.values))])
    assert np.isfinite(rl["accuracy"].sel(group=["forget_given", "retain", "test"]).values).all()


def test_finetune_takes_adamw_by_name():
    """optimizer="adam": one step of finetune is AdamW's first step (no weight decay) on the suffix loss, by hand:
    theta - lr g / (|g| + eps) (both moments bias-corrected)."""
    data = _data()
    model, task = _model("gpt", data.vocab_size), SequenceTask(data)
    by_hand = copy.deepcopy(model)
    finetune(model, task.train, epochs=1, lr=0.01, optimizer="adam", batch_size=len(data), task=task)
    p, s = data.prefix_len, data.suffix_len
    logits = _logits(by_hand.train(), data.tokens[:, :p + s - 1])
    loss = F.cross_entropy(logits[:, p - 1:].reshape(-1, logits.shape[-1]), data.tokens[:, p:p + s].reshape(-1))
    grads = torch.autograd.grad(loss, list(by_hand.parameters()))
    for (k, q), g, (_, r) in zip(by_hand.named_parameters(), grads, model.named_parameters()):
        assert torch.allclose(r, q - 0.01 * g / (g.abs() + 1e-8), rtol=1e-9, atol=1e-12), k


def test_lm_unlearning_defaults_to_the_runs_own_optimiser(memorising_lm, capsys):
    """A language model's run unlearns with its own training optimiser and lr unless told otherwise (recorded
    in the config); ascent at those defaults removes more targets than at the image defaults (SGD)."""
    from memloc.actions.continual import LM_ASCENT, LM_EPOCHS
    from memloc.actions.unlearn import HYPER
    run = memorising_lm
    own = memloc.unlearn(run, methods=["ascent"], seeds=(0,), device="cpu")
    lr = run.config["lr"]
    assert (own.config["optimizer"], own.config["lr"], own.config["epochs"]) == (run.config["optimizer"], lr, LM_EPOCHS)
    assert own.config["ascent_lr"] == pytest.approx(LM_ASCENT * lr) and "own training optimizer" in own.config["defaults"]
    sgd = memloc.unlearn(run, methods=["ascent"], seeds=(0,), optimizer="sgd", device="cpu")
    assert [sgd.config[k] for k in ("optimizer", "lr", "ascent_lr", "epochs")] == ["sgd", *(HYPER[k] for k in (
        "lr", "ascent_lr", "epochs"))]
    left = {name: float(r["accuracy"].sel(technique="ascent", seed=0, group="forget_given")) for name, r in
            (("own", own), ("sgd", sgd))}
    assert left["own"] < left["sgd"] <= float(sgd["baseline"].sel(group="forget_given"))
    given = memloc.unlearn(run, methods=["ascent"], seeds=(0,), ascent_lr=1e-4, device="cpu")
    assert given.config["ascent_lr"] == 1e-4 and given.config["optimizer"] == run.config["optimizer"]
    with pytest.raises(memloc.MemlocError, match="unknown optimizer 'rmsprop'"):
        memloc.unlearn(run, methods=["ascent"], optimizer="rmsprop", device="cpu")
    # mitigate's sinks refuse a run trained without them, in one line
    with pytest.raises(SystemExit) as e:
        cli_run("mitigate", [str(run.path), "--methods", "sinks", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "sinks needs a run trained with memorisation sinks" in err[0]
