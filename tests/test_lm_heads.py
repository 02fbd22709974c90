"""Attention heads as units of a language model (issues 23 and 24): a head is its slice of the attention
output before the output projection. Zeroing one is zeroing the projection's columns of that slice; flip's
batched searches over heads (and heads + MLP neurons) equal a one-sequence-at-a-time reference in float64;
localisation ranks a hand-made dominant head first by every cheap method; the combinations that do not
apply are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import memloc
from memloc.analyses.localise import neuron_scores
from memloc.analyses.localise.plots import plot_localise
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import TinyGPT, greedy_decode, lm_logits
from memloc.core.neurons import attention_heads, neuron_masks, unit_layers, unit_structure
from memloc.core.sequences import SequenceSet, TINYMEM_VOCAB
from memloc.core.units import unit_masks

from conftest import results_free_copy
from test_lm_flip import _assert_equals_reference, _rows

pytestmark = pytest.mark.usefixtures("one_thread")


def reproduced_by(model, n: int = 6, seed: int = 0, *, clean_without_head: int | None = None) -> SequenceSet:
    """``n`` sequences whose 3-token suffix is ``model``'s greedy continuation of a random 5-token prefix (so
    the model reproduces every one), the first half memorisation targets; with ``clean_without_head`` the
    clean half continues as the model does with that head (global id) zeroed."""
    prefix = torch.randint(0, 14, (n, 5), generator=torch.Generator().manual_seed(seed))
    target = np.arange(n) < n // 2
    with torch.no_grad():
        tokens = torch.cat([prefix, greedy_decode(model, prefix, 3)], 1)
        if clean_without_head is not None:
            heads = attention_heads(model)
            masks = torch.ones(len(heads), heads[0].size)
            masks.view(-1)[clean_without_head] = 0
            with neuron_masks(model, heads, masks):
                tokens[~target, 5:] = greedy_decode(model, prefix[~target], 3)
    return SequenceSet("random", tokens, tokens[:2], np.arange(n), target, np.where(target, "canary", "clean"), 5, 3,
                       list(TINYMEM_VOCAB))


def dominant_head(scale: float = 200.0):
    """A random TinyGPT (2 blocks of 2 heads) whose head 0 of block 1 writes ``scale`` x more than the
    others (its output-projection columns scaled): the head every suffix depends on (global head id 2)."""
    model = TinyGPT(14, n_layer=2, n_head=2, d_model=16, d_mlp=16, max_len=16, seed=0).eval()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, :8] *= scale
    return model


def test_a_head_is_its_slice_before_the_output_projection():
    model = dominant_head(1.0)
    heads = attention_heads(model)
    assert [(h.name, h.size, h.group) for h in heads] == [("blocks.0.attn.proj", 2, 8), ("blocks.1.attn.proj", 2, 8)]
    both = unit_structure(model, torch.zeros(1, 8, dtype=torch.long), "both")
    assert [(s.name, s.size) for s in both.spaces] == [("blocks.0.attn.proj", 2), ("blocks.0.mlp.down", 16),
                                                       ("blocks.1.attn.proj", 2), ("blocks.1.mlp.down", 16)]
    assert [layer.name for layer in unit_layers(model, "both")] == [s.name for s in both.spaces]
    x = torch.randint(0, 14, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(both.n_units)
    mask[[1, 18 + 2 + 5]] = 0                       # head 1 of block 0, neuron 5 of block 1
    rows = torch.ones(3, 2, 2)
    rows[1, 0, 1] = 0                               # the same head, one row only (neuron_masks)
    with torch.no_grad():
        with unit_masks(model, both, mask):
            masked = lm_logits(model, x)
        with neuron_masks(model, heads, rows):
            per_row = lm_logits(model, x)
        plain = lm_logits(model, x)
        model.blocks[0].attn.proj.weight[:, 8:] = 0
        torch.testing.assert_close(per_row[1], lm_logits(model, x)[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(per_row[[0, 2]], plain[[0, 2]], rtol=0, atol=0)
        model.blocks[1].mlp.down.weight[:, 5] = 0
        torch.testing.assert_close(masked, lm_logits(model, x), rtol=0, atol=1e-6)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_every_cheap_method_and_flip_find_the_dominant_head(tmp_path):
    model = dominant_head()
    data = reproduced_by(model)
    out = neuron_scores(model, data.tokens, 5, 3, units="heads", methods="zero_out,activations,ig,grad_x_act,greedy")
    assert out["layers"] == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    for method, scores in out["scores"].items():
        assert scores.shape == (6, 2, 2) and (scores.reshape(6, 4).argmax(1) == 2).all(), method
    assert (out["greedy_zeroed"] == 1).all() and out["greedy_broken"].all()
    res = memloc.localise_neurons(model, data, examples=[0, 1], units="heads", methods="grad_x_act,random", device="cpu")
    np.testing.assert_allclose(res["score"].values[0], out["scores"]["grad_x_act"][:2], rtol=1e-5, atol=1e-7)
    assert res.config["units"] == "heads" and "## Heads holding memorised sequences" in plot_localise(res, tmp_path)
    # flip keeps the clean reference's loss low: with clean sequences continued as the model does without head 2,
    # zeroing head 2 breaks each target and helps the reference, so every search zeroes it first and alone
    data = reproduced_by(model, clean_without_head=2)
    res = memloc.flip(model, data, examples="noisy:3", units="heads", max_units=4, device="cpu", resume=None)
    assert res.config["units"] == "heads" and res["layer_size"].values.tolist() == [2, 2]
    assert _rows(res) == {(i, 0): ([2], True) for i in range(3)}


def test_flip_on_heads_and_on_both_equals_the_one_sequence_reference_in_float64():
    model = dominant_head(8.0)
    data = reproduced_by(model, seed=3)
    for units, max_units in (("heads", 4), ("both", 12)):
        res, got = _assert_equals_reference(model, data, model, examples="noisy:3,clean:3", repeats=1, ref_batch_size=4,
                                            max_units=max_units, units=units)
        assert res.config["units"] == units and len(got) == 6
        assert max(len(u) for u, _ in got.values()) > 1, units          # some search zeroes several units
    # localisation's greedy on heads: batched equals one target at a time
    model.double()
    batched = neuron_scores(model, data.tokens, 5, 3, units="heads", methods="greedy,grad_x_act", eval_batch_size=6)
    for i in range(len(data.tokens)):
        one = neuron_scores(model, data.tokens[i:i + 1], 5, 3, units="heads", methods="greedy,grad_x_act",
                            eval_batch_size=1)
        assert one["greedy_zeroed"][0] == batched["greedy_zeroed"][i]
        for method in ("greedy", "grad_x_act"):
            np.testing.assert_allclose(one["scores"][method][0], batched["scores"][method][i], rtol=1e-10, atol=1e-14)


def test_command_units_and_what_does_not_apply(memorising_lm, tiny_run, tmp_path, capsys):
    run = results_free_copy(memorising_lm, tmp_path / "run")
    res = cli_run("flip", [str(run.path), "--examples", "noisy:3", "--units", "heads", "--max-units", "4",
                           "--device", "cpu"])
    assert run.result("flip").config["units"] == "heads" and list(res["layer_size"].values) == [2, 2]
    assert "units `heads`" in memloc.analyses.flip.plot_flip(res, tmp_path)
    capsys.readouterr()
    # unlearning by zeroing zeroes flip's own units: here heads (4 of them)
    from memloc.actions.unlearn import _zero_context
    flipped = res["example"].values[res["flipped"].values[:, 0]]
    assert len(flipped)
    _, zeroed = _zero_context(run, run.model(), run.data(), flipped)
    assert len(zeroed) and zeroed.max() < 4
    model, data = memorising_lm.model(), memorising_lm.data()
    for call, match in ((lambda: memloc.flip(tiny_run, units="heads", device="cpu", resume=None),
                         "a classifier's units are its layers' outputs: use units='outputs'"),
                        (lambda: memloc.flip(model, data, units="mlp", site="post_norm", device="cpu", resume=None),
                         "use site='pre_norm'"),
                        (lambda: memloc.flip(model, data, units="neurons", device="cpu", resume=None),
                         "unknown units 'neurons'; valid here: outputs, mlp, heads, both"),
                        (lambda: memloc.localise_neurons(model, data, units="both", device="cpu"),
                         "ranks one kind of unit at a time.*use units='mlp', then heads"),
                        (lambda: neuron_scores(torch.nn.Sequential(torch.nn.Embedding(14, 8), torch.nn.Linear(8, 14)),
                                               data.tokens, 5, 3, units="heads"), "no attention output projection")):
        with pytest.raises(MemlocError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        cli_run("flip", [str(run.path), "--units", "heads", "--site", "post_norm", "--overwrite", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "use --site pre_norm" in err, err


@pytest.mark.slow      # importing transformers takes 5-15 s on 2 busy cores
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_transformers_heads_are_the_output_projection_input_slices(family):
    model = memloc.hf_causal_lm(family, 14, n_layer=2, n_head=2, d_model=16, max_len=16, seed=0)
    heads = attention_heads(model)
    assert len(heads) == 2 and all((h.size, h.group) == (2, 8) for h in heads)
    x = torch.randint(0, 14, (2, 8), generator=torch.Generator().manual_seed(0))
    masks = torch.ones(2, 2)
    masks[1, 0] = 0
    with torch.no_grad(), neuron_masks(model, heads, masks):
        masked = lm_logits(model, x)
    out_proj = model.get_submodule(heads[1].name)
    with torch.no_grad():
        (out_proj.weight[:8] if family == "gpt2" else out_proj.weight[:, :8]).zero_()    # GPT-2's Conv1D: (in, out)
        torch.testing.assert_close(masked, lm_logits(model, x), rtol=1e-5, atol=1e-6)
    out = neuron_scores(model, x, 4, 4, units="heads", methods="zero_out,activations,grad_x_act,greedy,random")
    assert all(s.shape == (2, 2, 2) and np.isfinite(s).all() for s in out["scores"].values())
    if family == "gpt2":        # flip on GPT-2's heads (Conv1D projections): batched = one sequence at a time
        with torch.no_grad():
            model.transformer.wte.weight.mul_(20)
        res, got = _assert_equals_reference(model, reproduced_by(model), model, examples="noisy:3,clean:3", repeats=1,
                                            ref_batch_size=4, max_units=4, units="heads")
        assert list(res["layer"].values) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
        assert len(got) == 6
