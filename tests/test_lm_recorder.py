"""A Hugging Face GPT-2-config model trained in a user's own loop and recorded by SequenceRecorder
(issue 23, Runs): the run reads exactly like a memloc-trained one (same run.h5, model and sequences
rebuilt from run.json), and memorisation / exposure run on it."""
from __future__ import annotations


import h5py
import numpy as np
import pytest
import torch
from torch import nn

import memloc
from memloc.analyses.scores.tracin import run_lrs
from memloc.cli import run as cli_run
from memloc.core.dropout import example_ids, remove_example_tied_dropout, set_mode, sink_ids
from memloc.core.errors import MemlocError
from memloc.core.lm import sequence_measures
from memloc.core.sequence_recorder import SequenceRecorder
from memloc.training.train import train
from conftest import HF_SIZES, user_loop

from conftest import run_readme_example
from test_lm_sinks import _check_against_masks

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = HF_SIZES


def _layout(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.update({name: obj.dtype.kind}) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_user_loop_run_reads_like_a_memloc_run(hf_run, tmp_path):
    run, model, data = hf_run
    assert run.is_lm and run.epochs == list(range(7)) and run.num_train == len(data)
    # the same run.h5 as memloc's own language-model trainer writes
    own = train(tmp_path / "own", {"dataset": "tinymem:mult", "model": "gpt", "n_train": 8, "n_test": 4, "seq_len": 16,
                                   "epochs": 1, **SIZES}, device="cpu")
    assert _layout(run.path / "run.h5") == _layout(own.path / "run.h5")
    assert set(run.metrics()) == set(own.metrics())
    # model rebuilt from its recorded transformers config; sequences rebuilt from run.h5 (no corpus spec needed)
    assert "hf_config" in run.info["model"] and run.info["model"]["spec"] is None
    final = run.model()
    assert type(final) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), model.state_dict().values()))
    back = run.data()
    assert torch.equal(back.tokens, data.tokens) and torch.equal(back.test_tokens, data.test_tokens)
    assert (back.prefix_len, back.suffix_len, back.vocab) == (data.prefix_len, data.suffix_len, data.vocab)
    assert list(back.kind) == list(data.kind) and np.array_equal(back.copy_of, data.copy_of)
    assert back.info["modulus"] == data.info["modulus"]
    # every sequence presented each epoch, nothing at the initialisation
    pres = run.dynamics("memorised", "presentation")
    assert (pres[0] == -1).all() and (pres[1:] >= 0).all()


def test_a_loop_that_recorded_no_rates_gives_tracin_weights_1_with_a_warning(hf_run):
    """The user's loop gave the recorder neither its optimiser nor record_lr, its config no schedule."""
    with pytest.warns(UserWarning, match="weights every checkpoint 1 instead of its learning rate"):
        weights, source = run_lrs(hf_run[0], [1, 2])
    assert source == "none: 1" and weights.tolist() == [1.0, 1.0]


def test_memorisation_on_the_recorded_run_equals_the_recorded_dynamics(hf_run):
    run, model, data = hf_run
    for epoch in run.epochs:
        res = memloc.memorisation(run.model(epoch), run.data(), device="cpu")
        np.testing.assert_allclose(run.dynamics("suffix_loss")[epoch], res["suffix_loss"].values, rtol=1e-5)
        np.testing.assert_allclose(run.dynamics("suffix_accuracy")[epoch], res["suffix_accuracy"].values, rtol=1e-6)
        np.testing.assert_array_equal(run.dynamics("memorised")[epoch], res["memorised"].values)
        assert run.metrics()["target_memorised"][epoch] == pytest.approx(res["memorised"].values[run.is_noisy].mean())
    # the model learns and memorises some targets (duplicated noisy sequences)
    m = run.metrics()
    assert m["train_loss"][-1] < m["train_loss"][0] and m["target_memorised"][-1] > 0
    # and the flag is real greedy generation
    generated = memloc.greedy_decode(run.model(), data.prefixes, data.suffix_len)
    np.testing.assert_array_equal(run.dynamics("memorised")[-1].astype(bool), (generated == data.suffixes).all(1).numpy())


def test_exposure_on_a_recorded_canary_run(tmp_path):
    data = memloc.canaries(n_train=24, n_test=4, seq_len=24, repeats=(1, 8), n_digits=3)
    model = user_loop(tmp_path / "c", data, epochs=2, lr=1e-2)
    run = memloc.load(tmp_path / "c")
    back = run.data()
    assert back.info["canaries"] == data.info["canaries"] and back.info["encoding"] == "bytes"
    space = memloc.digit_space(3, digits=range(48, 58), separator=32)
    for c in back.info["canaries"]:
        args = (back.encode(c["prefix_text"]), back.encode(c["secret"]), space)
        assert memloc.exposure(run.model(), *args, device="cpu") == memloc.exposure(model, *args, device="cpu")


class NotAnLM(nn.Module):
    """Returns (B, V): one prediction per sequence, not per position."""

    def __init__(self, vocab=14):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, tokens):
        return self.emb(tokens).mean(1)


def test_user_mistakes_are_one_line_errors(tmp_path):
    data = memloc.tinymem("increment", n_train=8, n_test=2, seq_len=12)
    with pytest.raises(MemlocError, match=r"\(B, T, V\)"):
        SequenceRecorder(tmp_path / "a", NotAnLM(), data)
    assert not (tmp_path / "a").exists()                      # refused before any file is written
    small = memloc.hf_causal_lm("gpt2", vocab_size=10, max_len=12, **SIZES)
    with pytest.raises(MemlocError, match="10 logits per position"):
        SequenceRecorder(tmp_path / "b", small, data)
    model = memloc.hf_causal_lm("gpt2", vocab_size=14, max_len=12, **SIZES)
    rec = SequenceRecorder(tmp_path / "c", model, data)
    try:
        x = data.tokens[:4]
        logits = model(input_ids=x).logits
        with pytest.raises(MemlocError, match=r"\(B, T', V\)"):
            rec.record_batch(torch.arange(4), logits[:, -1], x)
        with pytest.raises(MemlocError, match="one sequence id in 0..7"):
            rec.record_batch(torch.arange(4) + 6, logits, x)
    finally:
        rec.close()


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_other_transformers_families_are_rebuilt_from_their_config(tmp_path, family):
    data = memloc.tinymem("increment", n_train=8, n_test=2, seq_len=12)
    model = memloc.hf_causal_lm(family, vocab_size=data.vocab_size, max_len=12, seed=1, **SIZES)
    SequenceRecorder(tmp_path / family, model, data).close()           # epoch 0 only
    run = memloc.load(tmp_path / family)
    back = run.model(0)
    assert type(back) is type(model) and back.config.model_type == family
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    res = memloc.memorisation(back, run.data(), device="cpu")
    np.testing.assert_allclose(run.dynamics("suffix_loss")[0], res["suffix_loss"].values, rtol=1e-5)


def test_sinks_in_a_user_loop_are_recorded_and_rebuilt(tmp_path, monkeypatch, capsys):
    """The documented loop (callbacks.md, example lm-sinks): run.json holds the sinks, the rebuilt model's
    train mode is each sequence's mask on the MLP neurons (duplicates share theirs), and `memloc dropout`
    evaluates them: its test mode is the run's own end-of-epoch measures."""
    scope = run_readme_example("lm-sinks", tmp_path, monkeypatch)
    run, res = memloc.load(tmp_path / "runs/loop-sinks"), scope["res"]
    assert run.info["model"]["etd"] == {"after": ["transformer.h.0.mlp.act"], "p_gen": 0.5, "p_mem": 0.25,
                                        "seed": 0, "kind": "example_tied"} and run.info["model"]["etd_ids"]
    _check_against_masks(run)
    acc, m = res["accuracy"].to_pandas(), run.metrics()
    assert acc.loc["test", "noisy"] == pytest.approx(m["target_memorised"][-1])
    assert acc.loc["test", "test_tokens"] == pytest.approx(m["test_accuracy"][-1])
    out = cli_run("dropout", [str(run.path), "--device", "cpu", "--overwrite"])
    assert np.array_equal(out["accuracy"].values, res["accuracy"].values, equal_nan=True)


def test_sinks_the_loop_trained_through_are_the_ones_evaluated(tmp_path):
    """At learning rate 0 each training forward (sinks bound by rec.sinks) is the rebuilt model's train mode
    with every sequence's sink id: the presentation measures equal it (and differ from test mode's)."""
    data = memloc.tinymem("mult", n_train=16, n_test=8, seq_len=16, suffix_len=4, noise=0.5, duplicate=4)
    user_loop(tmp_path / "r", data, epochs=1, lr=0.0, sinks={"p_gen": 0.5, "p_mem": 0.1})
    run = memloc.load(tmp_path / "r")
    model, back = run.model(1), run.data()
    measures = {}
    for mode in ("train", "test"):
        set_mode(model, mode)
        with torch.no_grad(), example_ids(model, sink_ids(back)):
            measures[mode] = sequence_measures(model, back.tokens, back.prefix_len, back.suffix_len, eval_batch_size=64)
    pres = run.dynamics("suffix_loss", "presentation")[1]
    np.testing.assert_allclose(pres, measures["train"]["suffix_loss"], rtol=1e-5)
    assert np.abs(pres - measures["test"]["suffix_loss"]).max() > 1e-3


def test_sinks_mistakes_are_one_line_errors(tmp_path):
    data = memloc.tinymem("increment", n_train=8, n_test=2, seq_len=12)
    model = memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, max_len=12, **SIZES)
    rec = SequenceRecorder(tmp_path / "plain", model, data)
    with pytest.raises(MemlocError, match="no memorisation sinks"):
        rec.sinks(torch.arange(2))
    rec.close()
    memloc.insert_example_tied_dropout(model, "transformer.h.0.mlp.act", p_gen=0.5, p_mem=0.1)
    with pytest.raises(MemlocError, match="memloc.insert_sinks"):
        SequenceRecorder(tmp_path / "raw", model, data)           # layers run.json could not rebuild
    assert not (tmp_path / "raw").exists()
    model = memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, max_len=12, **SIZES)
    with pytest.raises(MemlocError, match="p_mem must be"):
        memloc.insert_sinks(model, p_mem=2)
    memloc.insert_sinks(model)
    with pytest.raises(MemlocError, match="already has memorisation sinks"):
        memloc.insert_sinks(model)
    remove_example_tied_dropout(model)                         # the sinks and their spec gone: in again
    assert memloc.insert_sinks(model, seed=3)["seed"] == 3
    rec = SequenceRecorder(tmp_path / "unbound", model.train(), data)
    try:
        with pytest.raises(MemlocError, match=r"rec\.sinks\(idx\)"):
            model(input_ids=data.tokens[:2])                   # a training forward without its sink ids
    finally:
        rec.close()
