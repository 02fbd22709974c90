"""memloc.flip on language-model runs (issue 23, item 5: greedy unit zeroing): the memorisation targets in the
role of the noisy examples; a search zeroes units until the sequence's suffix is no longer reproduced exactly.
The batched searches against a plain one-sequence-at-a-time reference in float64, the stopping rule on the
model itself, the command line and the options a language model refuses (its weight site and input noise:
tests/test_lm_flip_weights.py)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memloc
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import lm_logits, sequence_measures
from memloc.core.schemas import LM_SUBSETS
from memloc.core.tasks import task_of
from memloc.core.neurons import unit_structure
from memloc.core.units import trace, unit_masks

from conftest import results_free_copy

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_lm_flip(model, structure, tokens, target_id, ref_tokens, ref_ids, p, s, *, max_units, site="pre_norm"):
    """One search, one sequence at a time, written plainly from the definition (float64): under the unit
    mask, stop when some suffix position's argmax is not the sequence's token; else zero the kept unit of
    highest mask x d(mean reference suffix loss - target suffix loss)/d(mask) (ties to the lowest id)."""
    model = copy.deepcopy(model).double().eval().requires_grad_(False)
    rows = torch.cat([tokens[None], ref_tokens])[:, :p + s]
    keep = torch.as_tensor(np.asarray(ref_ids)) != target_id
    mask = torch.ones(structure.n_units, dtype=torch.float64)
    units = []
    while True:
        m = mask.clone().requires_grad_(True)
        with unit_masks(model, structure, m, site=site):
            logits = lm_logits(model, rows[:, :-1])[:, p - 1:]           # (1 + B, s, V): the suffix's predictions
        if not torch.equal(logits[0].argmax(-1), rows[0, p:]):
            return units, True
        if len(units) == min(max_units, structure.n_units):
            return units, False
        loss = torch.stack([F.cross_entropy(logits[i], rows[i, p:]) for i in range(len(rows))])
        grad, = torch.autograd.grad(loss[1:][keep].mean() - loss[0], m)
        j = int((grad * mask).masked_fill(mask == 0, float("-inf")).argmax())
        units.append(j)
        mask[j] = 0


def _rows(res):
    """{(sequence id, repeat): (unit ids in order, flipped)} of the searched sequences of a flip result."""
    ids, off = res["unit_ids"].values, res["unit_offsets"].values
    r = res.sizes["repeat"]
    return {(int(e), k): (ids[off[i * r + k]:off[i * r + k + 1]].tolist(), bool(res["flipped"].values[i, k]))
            for i, e in enumerate(res["example"].values) if res["status"].values[i] == 0 for k in range(r)}


def _assert_equals_reference(source, data, model, *, examples, repeats, ref_batch_size, max_units,
                             site="pre_norm", units="outputs"):
    """``source``: a run (then ``data`` is its sequences) or ``model`` itself (then passed with ``data``)."""
    res = memloc.flip(source, data if source is model else None, examples=examples, repeats=repeats, ref_batch_size=ref_batch_size,
                      ref_pool="all", max_units=max_units, site=site, dtype="float64", group_size=3, device="cpu",
                      resume=None, units=units)     # the shared run's folder gets no part files
    structure = unit_structure(model, data.tokens[:2], units)
    assert list(res["layer"].values) == [sp.name for sp in structure.spaces]
    refs = res["reference"].values
    p, s = data.prefix_len, data.suffix_len
    got = _rows(res)
    for (e, r), value in got.items():
        want = reference_lm_flip(model, structure, data.tokens[e], e, data.tokens[torch.as_tensor(refs[r])], refs[r],
                                 p, s, max_units=max_units, site=site)
        assert value == want, f"sequence {e} repeat {r}"
    return res, got


def test_batched_equals_one_sequence_at_a_time_in_float64(memorising_lm):
    run, data = memorising_lm, memorising_lm.data()
    memorised = sequence_measures(run.model(), data.tokens, data.prefix_len, data.suffix_len)["memorised"]
    targets = np.flatnonzero(data.is_memorised_target & memorised)
    chosen = [int(targets[0]), int(targets[3]), int(targets[7]), int(np.flatnonzero(~memorised)[0])]
    refs_pool = np.setdiff1d(np.arange(len(memorised)), chosen)
    # a target inside its own reference batch is left out of the mean: the pool is every sequence
    res, got = _assert_equals_reference(run, data, run.model(), examples=chosen + [int(refs_pool[0])], repeats=2,
                                        ref_batch_size=len(memorised) - 1, max_units=40)
    # searched = reproduced exactly: a sequence the model does not reproduce gets status 1
    np.testing.assert_array_equal(res["status"].values, ~memorised[res["example"].values])
    assert np.array_equal(res["is_noisy"].values, data.is_memorised_target[res["example"].values])
    assert (res["label"].values == -1).all() and list(res["subset"].values) == list(LM_SUBSETS)
    assert len(got) >= 6 and all(f for _, f in got.values()) and max(len(u) for u, _ in got.values()) > 1


def test_a_search_stops_exactly_when_the_suffix_is_no_longer_reproduced(memorising_lm):
    run, data = memorising_lm, memorising_lm.data()
    model = run.model()
    res = memloc.flip(run, examples="noisy:6", max_units=50, collateral=True, device="cpu", resume=None)
    structure = trace(model, data.tokens[:2])
    p, s = data.prefix_len, data.suffix_len

    def reproduced(e, units):
        mask = torch.ones(structure.n_units)
        mask[torch.as_tensor(units, dtype=torch.long)] = 0
        with unit_masks(model, structure, mask):
            return bool(sequence_measures(model, data.tokens[e:e + 1], p, s)["memorised"][0])

    rows = _rows(res)
    assert rows and all(f for _, f in rows.values())
    for i, ((e, _), (units, _)) in enumerate(rows.items()):
        assert not reproduced(e, units) and reproduced(e, units[:-1])
        # collateral: the model with this search's units zeroed, measured over the run's sequences
        mask = torch.ones(structure.n_units)
        mask[torch.as_tensor(units, dtype=torch.long)] = 0
        with unit_masks(model, structure, mask):
            want = task_of(data).subset_row(model)
        k = list(res["example"].values).index(e)
        np.testing.assert_allclose(res["collateral"].values[k, 0], want)
    assert not any(m._forward_hooks for m in model.modules())      # no hook left behind


def test_command_and_what_a_language_model_refuses(memorising_lm, tmp_path, capsys):
    run = results_free_copy(memorising_lm, tmp_path / "run")
    res = cli_run("flip", [str(run.path), "--examples", "noisy:3,clean:2", "--max-units", "20", "--device", "cpu"])
    saved = run.result("flip")
    np.testing.assert_array_equal(saved["unit_ids"].values, res["unit_ids"].values)
    assert saved.config["site"] == "pre_norm" and saved.config["noise_samples"] == 0
    assert "examples searched" in capsys.readouterr().out
    # the neuron_count score reads it, per training sequence (NaN = not searched)
    count = memloc.scores(run, methods="neuron_count", device="cpu", resume=None)["neuron_count"].values
    np.testing.assert_array_equal(count[saved["example"].values], saved["neuron_count"].values)
    assert np.isnan(np.delete(count, saved["example"].values)).all()
    # the weight site and input noise on language models: tests/test_lm_flip_weights.py
    with pytest.raises(SystemExit) as e:
        cli_run("flip", [str(run.path), "--overwrite", "--device", "cpu", "--units", "mlp", "--site", "post_norm"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "use --site pre_norm" in err, err
    with pytest.raises(MemlocError, match="site='pre_norm'"):
        memloc.flip(run, units="heads", site="weight", device="cpu", resume=None)


@pytest.mark.slow      # importing transformers takes 5-15 s on 2 busy cores
def test_hf_gpt2_batched_equals_reference():
    """A GPT-2-config model and sequences it reproduces (each suffix its own greedy continuation of the
    prefix), given as a module and a SequenceSet; units of GPT-2's Conv1D projections, after the norm."""
    from dataclasses import replace

    from memloc.core.lm import greedy_decode, hf_causal_lm
    from memloc.core.sequences import tinymem
    data = tinymem("mult", n_train=12, n_test=4, seq_len=16, suffix_len=4, noise=0.25)
    model = hf_causal_lm("gpt2", data.vocab_size, n_layer=2, d_model=16, n_head=2, max_len=16, seed=0)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)         # confident predictions: a search zeroes a few units
        tokens = data.tokens.clone()
        tokens[:, data.prefix_len:data.prefix_len + data.suffix_len] = greedy_decode(model, tokens[:, :data.prefix_len], data.suffix_len)
    data = replace(data, tokens=tokens)
    res, got = _assert_equals_reference(model, data, model, examples="noisy:3,clean:3", repeats=1, ref_batch_size=6,
                                        max_units=30, site="post_norm")
    assert (res["status"].values == 0).all() and any(".mlp.c_fc" in str(n) for n in res["layer"].values)
    assert len(got) == 6 and max(len(u) for u, _ in got.values()) > 1
