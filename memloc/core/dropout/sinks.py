"""Memorisation sinks in a causal language model (MemSinks, Ghosal et al. 2025; Maini et al.'s
example-tied dropout applied to sequences).

The units are the MLP hidden neurons of every block (:mod:`memloc.core.neurons`): the output of each
MLP's activation module (``blocks.<i>.mlp.act`` of :class:`memloc.core.lm.TinyGPT`, GPT-2's and
GPT-NeoX's ``mlp.act``, Llama's ``mlp.act_fn``, whose output multiplies the up-projection: scaling it
scales the neuron). The first ``floor(p_gen * d_mlp)`` neurons of a layer are always on
(generalisation neurons); each of the others (a **sink**) is on for a training sequence with
probability ``p_mem``, a pure function of (run seed, layer name, sequence id, neuron): the same mask
at every presentation, on every device and after a resume. The sequence id is its row in the corpus;
a ``duplicate`` takes the id of the sequence it copies (all copies of a sequence share its sinks, as
MemSinks ties sinks to the sequence). At test time the sinks are dropped (``drop`` mode).

``etd_after="mlp"`` (:data:`MLP_SITES`) in :func:`memloc.train` of a language model resolves to
:func:`mlp_sites`; ``run.json`` stores the resolved module names, ``p_gen``, ``p_mem``, ``seed``,
``kind`` and ``ids`` (how the ids were derived), which is all a mask depends on.

In a user's own loop or a ``transformers.Trainer``, :func:`insert_sinks` puts the same sinks into the
model and remembers their spec on it (:func:`sinks_spec`): :class:`memloc.SequenceRecorder` and
:class:`memloc.HFTrainerCallback` record it in ``run.json`` (so ``memloc.load(RUN).model()`` rebuilds the
sinks and ``memloc dropout RUN`` evaluates them), ``with rec.sinks(idx):`` binds a batch's sink ids in a
loop, and the callback binds them itself (each row of ``input_ids`` found among ``data``'s sequences).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import MemlocError
from ..numeric import check_range
from ..neurons import mlp_layers
from .insert import _SINKS, insert_example_tied_dropout

__all__ = ["MLP_SITES", "ACTIVATIONS", "mlp_sites", "resolve_sites", "sink_ids", "SINK_IDS", "insert_sinks",
           "sinks_spec"]

#: the value of ``etd_after`` that names every MLP's hidden neurons
MLP_SITES = "mlp"
#: the names of an MLP's activation module, per family (TinyGPT / GPT-2 / GPT-NeoX: act; Llama: act_fn)
ACTIVATIONS = ("act", "act_fn")
#: how a sequence's sink id is derived (recorded in run.json as the spec's ``ids``)
SINK_IDS = "row; a duplicate takes the row it copies"


def mlp_sites(model) -> list[str]:
    """The activation module of every MLP of ``model`` (forward order): where its hidden neurons are
    the output; a :class:`MemlocError` when an MLP has none of :data:`ACTIVATIONS`."""
    modules = dict(model.named_modules())
    out = []
    for layer in mlp_layers(model):
        parent = layer.name.rpartition(".")[0]
        found = [f"{parent}.{a}" for a in ACTIVATIONS if f"{parent}.{a}" in modules]
        if not found:
            raise MemlocError(f"the MLP {parent!r} has no activation module ({' or '.join(ACTIVATIONS)}) to put "
                              "sinks after: give etd_after as module names", argument="etd_after")
        out.append(found[0])
    return out


def resolve_sites(model, after) -> list[str]:
    """``after`` (comma-separated names / patterns, or :data:`MLP_SITES`) as a list; ``"mlp"`` -> :func:`mlp_sites`."""
    names = [a.strip() for a in (after.split(",") if isinstance(after, str) else after) if str(a).strip()]
    return [site for name in names for site in (mlp_sites(model) if name == MLP_SITES else [name])]


def insert_sinks(model, *, after=MLP_SITES, p_gen: float = 0.4, p_mem: float = 0.1, seed: int = 0,
                 kind: str = "example_tied") -> dict:
    """Put memorisation sinks into ``model`` (a causal LM) as ``memloc train --etd-after mlp`` does, and
    remember their spec on it; returns the spec (``after`` resolved to module names, ``p_gen``, ``p_mem``,
    ``seed``, ``kind``: the keywords of :func:`memloc.core.dropout.insert_example_tied_dropout`).

    ``after``: :data:`MLP_SITES` (every MLP's hidden neurons) or module names / patterns. A
    :class:`memloc.SequenceRecorder` or :class:`memloc.HFTrainerCallback` on the model records the spec
    in ``run.json``; in train mode each forward needs its sequences' sink ids (``with rec.sinks(idx):``;
    the callback binds them itself)."""
    if not isinstance(model, torch.nn.Module):
        raise MemlocError(f"model must be a torch.nn.Module, got {type(model).__name__}", argument="model")
    if sinks_spec(model) is not None:
        raise MemlocError(f"{type(model).__name__} already has memorisation sinks", argument="model")
    spec = {"after": resolve_sites(model, after), "p_gen": float(check_range("p_gen", p_gen, low=0, high=1, low_open=True)),
            "p_mem": None if p_mem is None else float(check_range("p_mem", p_mem, low=0, high=1)),
            "seed": check_range("seed", seed, low=0, high=2**32 - 1, integer=True), "kind": kind}
    insert_example_tied_dropout(model, **spec)
    object.__setattr__(model, _SINKS, spec)
    return dict(spec)


def sinks_spec(model) -> dict | None:
    """The spec :func:`insert_sinks` put into ``model``, or None."""
    spec = getattr(model, "__dict__", {}).get(_SINKS)
    return None if spec is None else dict(spec)


def sink_ids(data) -> torch.Tensor:
    """(N,) int64 sink id of every training sequence of ``data`` (a SequenceSet): its row, or for a
    duplicate the row it copies; on the tokens' device."""
    copy_of = np.asarray(data.copy_of, dtype=np.int64)
    ids = np.where(copy_of >= 0, copy_of, np.asarray(data.ids, dtype=np.int64))
    return torch.as_tensor(ids, dtype=torch.int64, device=data.tokens.device)


def evaluate_sequence_modes(model, data, *, modes, batch_size: int = 256, precision: str = "fp32") -> np.ndarray:
    """(len(modes), 5) over :data:`memloc.core.schemas.LM_SUBSETS` of ``model`` (eval mode) on a
    SequenceSet with its dropout layers in each mode: memorised share of clean training sequences and
    of the targets, suffix token accuracy of clean and held-out sequences, held-out suffixes
    reproduced (the rule accuracy). In ``train`` mode each training sequence goes through its own
    sinks (:func:`sink_ids`) and the held-out columns are NaN (held-out sequences have no sinks).
    The layers' modes are left as they were."""
    from ..evaluate import eval_mode, nanmean
    from ..lm import sequence_measures
    from ..schemas import LM_SUBSETS
    from .insert import example_ids, require_dropout_layers, set_mode

    layers = require_dropout_layers(model)
    old = {name: layer.mode for name, layer in layers.items()}
    ids, noisy = sink_ids(data), np.asarray(data.is_memorised_target, dtype=bool)
    span = (data.prefix_len, data.suffix_len)
    out = np.full((len(modes), len(LM_SUBSETS)), np.nan)
    try:
        with eval_mode(model):
            for i, mode in enumerate(modes):
                set_mode(model, mode)
                parts = []
                for start in range(0, len(data.tokens), batch_size):
                    with example_ids(model, ids[start:start + batch_size]):
                        parts.append(sequence_measures(model, data.tokens[start:start + batch_size], *span,
                                                       eval_batch_size=batch_size, precision=precision))
                mem = np.concatenate([p["memorised"] for p in parts]).astype(bool)
                tok = np.concatenate([p["suffix_accuracy"] for p in parts])
                row = {"clean": nanmean(mem[~noisy]), "noisy": nanmean(mem[noisy]), "clean_tokens": nanmean(tok[~noisy])}
                if mode != "train":
                    test = sequence_measures(model, data.test_tokens, *span, eval_batch_size=batch_size,
                                             precision=precision)
                    row.update(test_tokens=nanmean(test["suffix_accuracy"]), test=nanmean(test["memorised"]))
                out[i] = [row.get(s, np.nan) for s in LM_SUBSETS]
    finally:
        for name, m in old.items():
            layers[name].mode = m
    return out
