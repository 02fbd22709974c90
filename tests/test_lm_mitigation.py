"""Mitigation after TinyMem (issue 24 item 4): BalancedSubnet / Subnet masks, the greedy searches, the
"mitigation" result measured independently, the command, and the error paths."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import memloc
from memloc.analyses.mitigation.methods import FUNCTIONS, Task, clean_batches, mitigation_options
from memloc.analyses.mitigation.subnet import mlp_weights, subnet
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import TinyGPT, lm_logits, sequence_measures, suffix_measures
from memloc.core.neurons import mlp_layers, neuron_masks
from memloc.training.train import train
from conftest import in_fp32_and_bf16, trained_to_memorise

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(model, x):
    with torch.no_grad():
        return suffix_measures(lm_logits(model, x[:, :-1]), x, 5, 5)


@pytest.fixture(scope="module")
def memorising():
    """A TinyGPT that reproduces ALL 8 of its training sequences (test_lm_del's stops at its 4 targets): the
    first 4 are the memorisation targets, the other 4 the clean sequences to keep; 6 test sequences."""
    return trained_to_memorise(8)


def _task(model, data):
    x = data.tokens
    return Task(copy.deepcopy(model), x[:4], torch.ones(4, dtype=torch.bool), x[4:], x[4:], 5, 5)


@pytest.mark.parametrize("balanced", [True, False])
def test_subnet_prunes_the_asked_share_and_removes_the_targets(memorising, balanced):
    model, data = memorising
    t = _task(model, data)
    pruned = subnet(t.model, t.targets, t.clean, 5, 5, sparsity=0.2, balanced=balanced,   # 40 steps (one batch)
                    opts={**mitigation_options(None)["subnet"], "epochs": 40, "lr": 1.0 if balanced else 0.1}, seed=0)
    old = dict(model.named_parameters())
    expected = 0
    for name, param in t.model.named_parameters():       # only MLP weights change, each to 0 or kept
        changed = param.detach() != old[name].detach()
        if changed.any():
            assert name.rpartition(".")[0] in dict(mlp_weights(t.model)) and (param.detach()[changed] == 0).all()
    for name, module in mlp_weights(t.model):
        zero = int((module.weight == 0).sum())
        assert zero == int(0.2 * module.weight.numel())       # the mask's sparsity, exactly
        expected += zero
    assert pruned == expected and len(mlp_weights(t.model)) == 4     # up and down of 2 blocks
    loss0, _, memorised0 = _loss(model, data.tokens)
    loss, _, memorised = _loss(t.model, data.tokens)
    assert not memorised[:4].any()                            # every target removed
    assert float(loss[:4].mean()) > float(loss0[:4].mean()) + 0.3
    if balanced:     # the clean sequences reproduced before stay so, their loss within 0.1 nats of before
        assert memorised0[4:].all() and memorised[4:].all() and float(loss[4:].mean()) < float(loss0[4:].mean()) + 0.1
    assert all(q.requires_grad for q in t.model.parameters()) and not hasattr(t.model.blocks[0].mlp.up,
                                                                                "parametrizations")


def test_greedy_searches_stop_once_no_target_is_reproduced(memorising):
    model, data = memorising
    for method, unit in (("greedy", "neuron"), ("greedy_weights", "weight")):
        t = _task(model, data)
        n = FUNCTIONS[method](t, mitigation_options({"greedy_weights": {"per_step": 0.005}})[method], 0.5)
        _, _, memorised = _loss(t.model, data.tokens)
        assert not memorised[:4].any() and n >= 1, method
        if unit == "weight":      # exactly n MLP weights set to 0, nothing else touched
            diff = sum(int((a != b).sum()) for a, b in zip(t.model.parameters(), model.parameters()))
            assert diff == n
        else:
            zeroed = [int((t.model.get_submodule(layer.name).weight == 0).all(0).sum()) for layer in mlp_layers(model)]
            assert sum(zeroed) == n


def test_fine_tune_greedy_fine_tunes_then_zeroes_weights_until_no_target_is_reproduced(memorising):
    model, data = memorising
    t = _task(model, data)
    opts = mitigation_options({"fine_tune_greedy": {"max_epochs": 2, "per_step": 0.005, "ascent_weight": 0.0}})
    n = FUNCTIONS["fine_tune_greedy"](t, opts["fine_tune_greedy"], 0.5)          # fine-tuning alone leaves targets
    _, _, memorised = _loss(t.model, data.tokens)
    assert not memorised[:4].any() and n >= 1
    # every weight was fine-tuned (none exactly 0 after Adam), then exactly n MLP weights set to 0
    assert sum(int((module.weight == 0).sum()) for _, module in mlp_weights(t.model)) == n
    assert not torch.equal(t.model.tok.weight, model.tok.weight) and not t.model.training
    assert all(q.requires_grad for q in t.model.parameters())
    with pytest.raises(MemlocError, match="clean must be 'rotate' or 'fixed'"):
        mitigation_options({"fine_tune_greedy": {"clean": "sometimes"}})


def test_fine_tune_greedy_ascends_on_the_targets_each_step_still_reproduces(memorising, monkeypatch):
    """ascent_weight: it removes the targets that fine-tuning alone leaves to the greedy phase (2 epochs of 2
    steps); step by step (4 steps an epoch): each epoch's ascent starts from the targets reproduced at its
    start, each step's from those of the step before that its forward reproduced, and the loss gradient
    reaches exactly the rows reproduced, each pushed up."""
    import memloc.analyses.mitigation.methods as methods
    model, data = memorising

    def opts(ascent, batch_size=2):
        return mitigation_options({"fine_tune_greedy": {"max_epochs": 2, "batch_size": batch_size, "per_step": 0.005,
                                                        "ascent_weight": ascent}})["fine_tune_greedy"]
    zeroed = {}
    for ascent in (0.0, 0.3):
        t = _task(model, data)
        zeroed[ascent] = FUNCTIONS["fine_tune_greedy"](t, opts(ascent), 0.5)
        assert not _loss(t.model, data.tokens)[2][:4].any(), ascent
    assert zeroed[0.0] >= 1 and zeroed[0.3] == 0
    events, grads, loss, memorised = [], [], methods._loss, Task.memorised

    def recorded_loss(t, rows):
        got = loss(t, rows)
        events.append(("step", rows, got[1]))
        got[0].register_hook(lambda grad: grads.append((grad, got[1])))
        return got

    def recorded_memorised(t):
        got = memorised(t)
        events.append(("epoch", t.targets[torch.from_numpy(got)], None))
        return got
    monkeypatch.setattr(methods, "_loss", recorded_loss)
    monkeypatch.setattr(Task, "memorised", recorded_memorised)
    t = _task(model, data)
    FUNCTIONS["fine_tune"](t, opts(0.3, batch_size=1), 0.5)
    kinds = [kind for kind, _, _ in events]
    assert kinds[0] == "epoch" and kinds.count("step") >= 4 and len(events[0][1]) == 4
    # some target drops out at a step that another step of the same epoch follows
    assert any(a[0] == b[0] == "step" and not a[2].all() for a, b in zip(events, events[1:]))
    for (kind, rows, _), (_, before, reproduced) in zip(events[1:], events):
        if kind == "step":          # the rows ascended on: the last step's reproduced ones (the epoch's at its start)
            assert torch.equal(rows, before if reproduced is None else before[reproduced])
    assert grads and all((g[~r] == 0).all() and (g[r] < 0).all() for g, r in grads)


def test_greedy_weights_keeps_a_new_clean_batch_low_at_each_step(memorising, monkeypatch):
    """clean="rotate": each step's clean term is the next batch of clean_batches (2 of the 4 clean sequences in
    turn); clean="fixed": the reference at every step."""
    import memloc.analyses.mitigation.methods as methods
    model, data = memorising
    x = data.tokens
    seen = []
    original = methods._loss
    monkeypatch.setattr(methods, "_loss", lambda t, rows: seen.append(rows) or original(t, rows))
    for clean in ("rotate", "fixed"):
        seen.clear()
        t = Task(copy.deepcopy(model), x[:4], torch.ones(4, dtype=torch.bool), x[4:6], x[4:], 5, 5, seed=1)
        opts = mitigation_options({"greedy_weights": {"per_step": 0.001, "clean": clean}})["greedy_weights"]
        FUNCTIONS["greedy_weights"](t, opts, 0.5)
        batches = [rows for rows in seen if len(rows) == 2 and not any(torch.equal(r, q) for r in rows for q in x[:4])]
        steps = len(batches)
        assert steps >= 2
        want = [clean_batches(t)(k) for k in range(steps)] if clean == "rotate" else [x[4:6]] * steps
        assert all(torch.equal(a, b) for a, b in zip(batches, want)), clean
        if clean == "rotate":     # the batches go round all 4 clean sequences
            assert {tuple(r.tolist()) for b in batches for r in b} == {tuple(r.tolist()) for r in x[4:]}


def test_clean_batches_take_every_clean_sequence_in_turn():
    pool = torch.arange(8 * 12).reshape(8, 12)           # 8 distinct clean sequences of 12 tokens
    t = Task(None, pool[:0, :10], torch.ones(0, dtype=torch.bool), pool[:3, :10], pool, 5, 5, seed=3)
    batch = clean_batches(t)
    rows = torch.cat([batch(step) for step in range(8)])  # 8 steps of 3 rows: every sequence 3 times
    assert rows.shape == (24, 10) and torch.equal(rows, pool[rows[:, 0] // 12, :10])
    first = rows[:, 0] // 12
    assert sorted(first[:8].tolist()) == list(range(8))   # the first round: each sequence once
    assert torch.bincount(first, minlength=8).tolist() == [3] * 8
    assert torch.equal(batch(5), clean_batches(t)(5))     # the order is the seed's
    other = clean_batches(Task(None, t.targets, t.was_memorised, t.clean, pool, 5, 5, seed=4))
    assert not torch.equal(torch.cat([other(s) for s in range(3)]), rows[:9])
    empty = clean_batches(Task(None, t.targets, t.was_memorised, pool[:0, :10], pool, 5, 5))
    assert empty(0).shape == (0, 10)                      # ref_batch_size 0: no clean term


def test_mitigate_reports_what_the_edits_do(memorising):
    model, data = memorising
    res = memloc.mitigate(model, data, methods="zero_out,random,fine_tune", fractions="0.1,0.5", ref_batch_size=4,
                          options={"fine_tune": {"max_epochs": 2}}, device="cpu")
    assert res["setting"].values.tolist() == ["zero_out@0.1", "zero_out@0.5", "random@0.1", "random@0.5", "fine_tune"]
    assert np.isnan(res["fraction"].values[-1]) and res["changed"].values.tolist()[:4] == [6, 32, 6, 32]
    assert float(res["targets_memorised_before"]) == 1.0 and np.isnan(float(res["rule_accuracy_before"]))
    assert (res["seconds"].values >= 0).all() and res["memorised"].shape == (5, 4)
    # zero_out@0.1, recomputed by hand: the top 3 neurons per layer of the mean per-target score zeroed
    scores = memloc.neuron_scores(model, data.tokens[:4], 5, 5, methods="zero_out")["scores"]["zero_out"].mean(0)
    masks = torch.ones(2, 32)
    for layer in range(2):
        masks[layer, torch.as_tensor(np.argsort(-scores[layer], kind="stable")[:3])] = 0
    with neuron_masks(model, mlp_layers(model), masks):
        train_m = sequence_measures(model, data.tokens, 5, 5)
        test_m = sequence_measures(model, data.test_tokens, 5, 5)
    assert res["targets_memorised"].values[0] == pytest.approx(train_m["memorised"][:4].mean())
    assert res["others_memorised"].values[0] == pytest.approx(train_m["memorised"][4:].mean())
    assert res["memorised"].values[0].tolist() == train_m["memorised"][:4].tolist()
    assert res["test_loss"].values[0] == pytest.approx(test_m["suffix_loss"].mean(), rel=1e-5)
    assert res["test_accuracy"].values[0] == pytest.approx(test_m["suffix_accuracy"].mean())


def test_mitigate_errors(memorising):
    model, data = memorising
    for kwargs, match in (({"methods": "nope"}, r"no mitigation method \('nope'\)"), ({"methods": ""}, "none given"),
                          ({"fractions": 0}, r"each must be in \(0, 1\]"), ({"fractions": "0.1,2"}, "2.0"),
                          ({"fractions": "x"}, "no number"), ({"fractions": []}, "empty"),
                          ({"options": {"subnet": {"rate": 1}}}, "no 'rate'"),
                          ({"options": {"nope": {}}}, "no mitigation method 'nope'"),
                          ({"options": {"fine_tune_greedy": {"ascent_weight": -1}}}, "ascent_weight must be a finite "
                           "number >= 0, not -1"),
                          ({"options": {"balanced_subnet": {"lr": "fast"}}}, "lr must be a finite number >= 0"),
                          ({"options": {"fine_tune": {"max_epochs": 2.5}}}, "max_epochs must be a whole number >= 1"),
                          ({"options": {"ig": {"n_steps": 0}}}, "options for ig: n_steps must be a whole number"),
                          ({"options": {"greedy_weights": {"per_step": True}}}, "per_step must be a finite number"),
                          ({"ref_batch_size": -1}, "ref_batch_size")):
        with pytest.raises(MemlocError, match=match):
            memloc.mitigate(model, data, device="cpu", **kwargs)
    fresh = TinyGPT(14, n_layer=2, n_head=2, d_model=32, d_mlp=32, max_len=16, seed=1).eval()
    with pytest.raises(MemlocError, match="reproduces none of its memorisation targets"):
        memloc.mitigate(fresh, data, methods="random", device="cpu")
    with pytest.raises(MemlocError, match="no test sequences"):
        memloc.mitigate(model, data.__class__(**{**data.__dict__, "test_tokens": torch.zeros(0, 10)}),
                        methods="random", device="cpu")


def test_command_on_a_tinymem_run(tmp_path, capsys):
    cfg = {"dataset": "tinymem:mult", "model": "gpt", "n_layer": 2, "d_model": 32, "n_head": 2, "n_train": 16,
           "n_test": 8, "seq_len": 16, "suffix_len": 4, "noise": 0.5, "duplicate": 4, "epochs": 10, "batch_size": 8,
           "lr": 2e-2, "weight_decay": 0.0}
    run = train(tmp_path / "mem", cfg, device="cpu")
    cli_run("mitigate", [str(run.path), "--methods", "greedy_weights,random", "--fractions", "0.2",
                         "--set", "greedy_weights.per_step=0.01", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "greedy_weights@0.2" in out and "wrote" in out
    res = run.result("mitigation")
    assert res.config["options"]["greedy_weights"]["per_step"] == 0.01
    assert res["targets_memorised"].values[0] < float(res["targets_memorised_before"])
    assert 0 <= float(res["rule_accuracy_before"]) <= 1
    for argv, flag in ((["--methods", "nope"], "--methods"), (["--fractions", "1.5"], "--fractions"),
                       (["--set", "subnet.rate=1"], "--set for subnet"),
                       (["--set", "fine_tune_greedy.ascent_weight=abc"], "--set for fine_tune_greedy: ascent_weight")):
        with pytest.raises(SystemExit) as e:
            cli_run("mitigate", [str(run.path), *argv, "--overwrite", "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and len(err.strip().splitlines()) == 1, err


def test_mitigate_in_bf16_is_close_to_fp32(memorising):
    """precision: every forward pass (the measures, the methods' and fine-tuning's) under bf16 autocast; the
    measures after the same zeroing (random neurons) and after a fine-tuning epoch stay close to fp32's."""
    model, data = memorising
    kw = dict(methods="random,fine_tune", fractions=(0.1,), ref_batch_size=2, options={"fine_tune": {"max_epochs": 1}},
              device="cpu")
    a, b = in_fp32_and_bf16(lambda **p: memloc.mitigate(model, data, **kw, **p), "test_loss")
    for name in ("test_loss", "test_loss_before", "test_accuracy", "targets_memorised_before"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=0.03, atol=0.02, err_msg=name)
    with pytest.raises(MemlocError, match="precision 'fp8' is unknown"):
        memloc.mitigate(model, data, precision="fp8", **kw)
    ours = memloc.mitigate(model, data, methods="fine_tune_greedy", fractions=(0.5,), ref_batch_size=2,  # the ascent
                           options={"fine_tune_greedy": {"max_epochs": 2}}, precision="bf16", device="cpu")
    assert float(ours["targets_memorised"][0]) == 0 and float(ours["targets_memorised_before"]) == 1


def test_sinks_dropped_are_their_neurons_zeroed(memorising):
    """methods=["sinks"] on a model with sinks (p_mem = 1: in test mode the model as trained) measures it in drop
    mode: the sink neurons (all but the first floor(p_gen d) of each MLP) zeroed and the others scaled by
    (p_gen + p_mem) / p_gen, here by scaling their output weights; a model without sinks is refused."""
    from memloc.core.dropout import insert_example_tied_dropout
    from memloc.core.neurons import output_weights
    model, data = memorising
    sinky = copy.deepcopy(model)
    insert_example_tied_dropout(sinky, "blocks.*.mlp.act", p_gen=0.5, p_mem=1.0)
    res = memloc.mitigate(sinky, data, methods=["sinks"], device="cpu")
    assert list(res["setting"].values) == ["sinks"] and float(res["targets_memorised_before"]) == 1.0
    scaled = copy.deepcopy(model)
    layers = mlp_layers(scaled)
    scale = torch.zeros(layers[0].size)
    scale[:layers[0].size // 2] = (0.5 + 1.0) / 0.5
    with torch.no_grad():
        for layer in layers:
            weight, dim = output_weights(scaled, layer)
            weight.mul_(scale.reshape([-1 if d == dim else 1 for d in range(weight.ndim)]))
    _, _, memorised = _loss(scaled, data.tokens)
    loss, accuracy, _ = _loss(scaled, data.test_tokens)
    assert int(res["changed"][0]) == len(layers) * layers[0].size // 2
    assert float(res["targets_memorised"][0]) == float(memorised[:4].float().mean())
    assert float(res["others_memorised"][0]) == float(memorised[4:].float().mean())
    assert float(res["test_loss"][0]) == pytest.approx(float(loss.mean()), rel=1e-5)
    assert float(res["test_accuracy"][0]) == pytest.approx(float(accuracy.float().mean()), rel=1e-6)
    with pytest.raises(MemlocError, match="sinks needs a run trained with memorisation sinks"):
        memloc.mitigate(model, data, methods=["sinks"], device="cpu")
