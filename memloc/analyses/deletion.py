"""DEL, the natural-memorisation benchmark of neuron localisation (after MemPi, Chang et al. NAACL 2024).

``memloc.del_benchmark(source, data=None, *, fractions=(0.001, 0.005, 0.01), methods=METHODS)``:

1. the targets are sequences the run memorised by itself: the memorisation targets (noisy TinyMem
   sequences, canaries) whose suffix greedy decoding reproduces (``examples``, as
   :func:`memloc.localise_neurons`); every memorised target is also one of the "other" sequences;
2. every localisation method (:func:`memloc.neuron_scores`) scores the MLP neurons for each target
   (greedy stops at the break, ``min_zeroed`` 0, unless ``options`` say otherwise: on the TinyGPT run of
   scripts/lm_del.py, carrying it on to the largest count x layers, its default elsewhere, deleted the
   same targets, kept 0.91 / 0.77 of the other memorised ones instead of 0.93 / 0.80 at 1 / 3 neurons per
   layer and took about 8x the time; ``"auto"`` carries it on to the largest count);
3. for each method and fraction f, the top ``max(1, round(f * d_mlp))`` neurons of every layer (MemPi
   picks per layer too) are zeroed (:func:`memloc.core.neurons.neuron_masks`) and, under that
   zeroing, the target, every OTHER memorised target and every held-out (test) sequence are measured
   (:func:`memloc.core.lm.suffix_measures`).

``units="heads"``: the methods rank the attention heads instead (:func:`memloc.localise_neurons`'s
``units``) and the top ``max(1, round(f * n_head))`` heads of every layer are zeroed (their slice of the
output projection's input); the config records ``units`` and the units of a layer (``d_mlp`` / ``n_head``).

The ``"del"`` result, per (method, fraction, target): ``memorised`` (the target still reproduced),
``accuracy`` / ``loss`` of its suffix, ``kept`` (specificity: the share of the other memorised
sequences still reproduced), ``test_loss`` / ``test_accuracy`` (mean over the test sequences); per
target the same before zeroing; per method the localisation seconds per target. A method scores
``eval_batch_size`` targets in one call (greedy and the masks batch them), so ``seconds`` is the calls'
time / targets. Under torchrun the batches of targets are split across the processes (one process's result).
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..core.errors import MemlocError
from ..core.lm import lm_logits, sequence_measures, suffix_measures
from ..core.neurons import neuron_masks, unit_layers
from ..core.precision import autocast, check_precision
from ..core.registry import Analysis
from ..core.results import Result
from ..core.runtime import check_choices, check_range, split_list
from ..core.schemas import Schema, Var
from ..core.store import stored
from ..core.selection import lm_source
from ..scale.distributed import world
from ..scale.parts import Columns, split_rows
from .localise import (METHODS, method_options, neuron_scores, reference_rows, resolved_options, select_targets,
                       target_parts)
from .localise.methods import check_localised_units
from .localise.plots import plot_del

__all__ = ["del_benchmark", "zeroing_masks", "check_fractions", "FRACTIONS"]

#: MemPi's DEL fractions of the neurons (of each layer)
FRACTIONS = (0.001, 0.005, 0.01)


def check_fractions(fractions) -> list[float]:
    """``fractions`` (a number, a list or ``"0.001,0.01"``) as a list of floats in (0, 1], no repeats."""
    items = split_list(fractions) if isinstance(fractions, str) else (
        [fractions] if np.ndim(fractions) == 0 else list(fractions))
    out = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise MemlocError(f"fractions holds {item!r}, which is no number; give fractions of each layer's "
                              "neurons in (0, 1], e.g. 0.001,0.005,0.01", argument="fractions") from None
        if not 0 < value <= 1:
            raise MemlocError(f"fractions holds {value!r}; each must be in (0, 1] (a share of a layer's neurons, "
                              "e.g. 0.01 for 1%)", argument="fractions")
        if value not in out:
            out.append(value)
    if not out:
        raise MemlocError("fractions is empty; give fractions of each layer's neurons in (0, 1]", argument="fractions")
    return out


def zeroing_masks(scores: np.ndarray, k: int) -> torch.Tensor:
    """(B, L, d) float masks from ``scores`` (B, L, d): 0 on each row's top ``k`` neurons of every layer
    (ties: the lower index), 1 elsewhere."""
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    masks = np.ones(scores.shape, dtype=np.float32)
    np.put_along_axis(masks, top, 0.0, axis=-1)
    return torch.from_numpy(masks)


@torch.no_grad()
def _measure(model, layers, tokens, p: int, s: int, mask, eval_batch_size: int, precision: str = "fp32"):
    """(loss, accuracy, memorised) numpy arrays (N,) of ``tokens`` under one (L, d) ``mask``, in ``precision``."""
    out = [[], [], []]
    with neuron_masks(model, layers, mask):
        for i in range(0, len(tokens), eval_batch_size):
            batch = tokens[i:i + eval_batch_size]
            with autocast(precision, batch.device):
                logits = lm_logits(model, batch[:, :p + s - 1])
            for acc, v in zip(out, suffix_measures(logits, batch, p, s)):
                acc.append(v.cpu())
    return [torch.cat(v).numpy() if v else np.zeros(0) for v in out]


@stored("del")
def del_benchmark(source, data=None, *, fractions=FRACTIONS, methods=METHODS, examples="memorised",
                  options: dict | None = None, ref_batch_size: int = 8, checkpoint: int | None = None,
                  eval_batch_size: int = 64, seed: int = 0, device="auto", precision: str = "fp32", units: str = "mlp",
                  resume=None, overwrite: bool = False) -> Result | None:
    """The ``"del"`` result (module docstring) of a language-model run (``checkpoint`` default final) or
    a causal LM module with ``data`` (a SequenceSet): ``methods`` localise each memorised target
    (``examples``: ``"memorised"``, ``"memorised:N"``, ids or a mask, all memorised); the top
    ``fractions`` of every layer's neurons are zeroed. ``options`` / ``ref_batch_size`` / ``seed`` as
    :func:`memloc.localise_neurons`. ``precision``: every forward pass under autocast
    (:mod:`memloc.core.precision`). ``resume`` / ``overwrite`` and torchrun as :func:`memloc.localise_neurons`
    (the targets' batches split across the processes, rank 0 returning the result). ``units``: rank and zero
    the MLP neurons (``"mlp"``) or the attention heads (``"heads"``; module docstring)."""
    fracs = check_fractions(fractions)
    chosen = check_choices("methods", methods, METHODS, "localisation method")
    check_localised_units(units)
    method_options(options)
    options = {**(options or {}), "greedy": {"min_zeroed": 0, **(options or {}).get("greedy", {})}}   # step 2
    ref_batch_size = check_range("ref_batch_size", ref_batch_size, low=0, integer=True)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    check_precision(precision)
    folder = target_parts(source, resume, "del")
    model, data, epoch = lm_source(source, data, checkpoint=checkpoint, device=device, analysis="del_benchmark")
    layers = unit_layers(model, units)
    d = layers[0].size
    p, s = data.prefix_len, data.suffix_len
    dev = next(model.parameters()).device
    check_precision(precision, dev)
    before = sequence_measures(model, data.tokens, p, s, eval_batch_size=eval_batch_size, precision=precision)
    pool = np.flatnonzero(before["memorised"] & data.is_memorised_target)      # every memorised target
    if not len(pool):
        raise MemlocError("the model reproduces none of its memorisation targets at this checkpoint, so there is no "
                          "memorised sequence to delete: train it longer (more epochs) or pass a later checkpoint",
                          argument="source")
    rows = select_targets(model, data, examples, eval_batch_size=eval_batch_size, precision=precision)
    missing = [int(data.ids[r]) for r in rows if r not in set(pool.tolist())]
    if missing:
        raise MemlocError(f"examples holds sequence {missing[0]}, which is not a memorised memorisation target (DEL "
                          "deletes memorised sequences): use {examples}", options={"examples": "memorised"})
    if not len(data.test_tokens):
        raise MemlocError(f"data {data.name!r} has no test sequences: DEL measures the held-out loss", argument="data")
    tokens, ids = data.tokens[torch.as_tensor(rows)].to(dev), np.asarray(data.ids[rows], dtype=np.int64)
    others = data.tokens[torch.as_tensor(pool)][:, :p + s].to(dev)
    test = data.test_tokens[:, :p + s].to(dev)
    ref = reference_rows(data, ref_batch_size, exclude=rows, seed=seed)
    reference = data.tokens[torch.as_tensor(ref)] if len(ref) else None
    counts = [max(1, int(round(f * d))) for f in fracs]
    test_before = _measure(model, layers, test, p, s, torch.ones(len(layers), d, device=dev), eval_batch_size,
                           precision)
    per = (len(chosen), len(fracs))
    columns = Columns(**{k: per for k in _MEASURED}, seconds=(len(chosen),))

    def work(chunk):        # one batch of targets: localised together, then each target's zeroings measured
        got = neuron_scores(model, tokens[chunk], p, s, methods=chosen, reference=reference, options=options,
                            eval_batch_size=eval_batch_size, seed=seed, precision=precision, units=units,
                            ids=ids[chunk], top_k=max(counts))
        out = {k: np.full((len(chunk), *per), np.nan) for k in _MEASURED}
        for a, method in enumerate(chosen):
            for b, k in enumerate(counts):
                masks = zeroing_masks(got["scores"][method], k).to(dev)
                for i, row in enumerate(rows[chunk]):
                    loss, acc, mem = _measure(model, layers, others, p, s, masks[i], eval_batch_size, precision)
                    me = pool == row
                    out["loss"][i, a, b], out["accuracy"][i, a, b], out["memorised"][i, a, b] = (
                        loss[me][0], acc[me][0], mem[me][0])
                    if (~me).any():
                        out["kept"][i, a, b] = mem[~me].mean()
                    t_loss, t_acc, _ = _measure(model, layers, test, p, s, masks[i], eval_batch_size, precision)
                    out["test_loss"][i, a, b], out["test_accuracy"][i, a, b] = t_loss.mean(), t_acc.mean()
        return columns.pack(**out, seconds=np.tile([got["seconds"][m] / len(chunk) for m in chosen], (len(chunk), 1)))
    config = {"methods": chosen, "fractions": fracs,
              "options": resolved_options(options, chosen, len(layers), d, max(counts)),
              "prefix_len": p, "suffix_len": s, ("n_head" if units == "heads" else "d_mlp"): d, "n_layers": len(layers),
              "memorised": [int(i) for i in data.ids[pool]], "reference": [int(i) for i in data.ids[ref]],
              "checkpoint": epoch, "eval_batch_size": eval_batch_size, "seed": seed, "device": str(dev),
              "data": data.name, "precision": precision, "units": units}
    got = columns.unpack(split_rows(len(rows), eval_batch_size, work, folder=folder, what="del",
                                    settings={**config, "device": dev.type, "targets": ids.tolist()},
                                    overwrite=overwrite))
    if world()[0] > 0:
        return None             # rank 0 returns the merged result
    out = {k: got[k].transpose(1, 2, 0) for k in _MEASURED}
    out["memorised"] = out["memorised"].astype(bool)
    dims = ("method", "fraction", "target")
    variables = {key: (dims, value) for key, value in out.items()}
    variables.update({
        "zeroed": ("fraction", np.asarray(counts, dtype=np.int64)),
        "seconds": ("method", got["seconds"].sum(0) / len(rows)),
        "loss_before": ("target", before["suffix_loss"][rows].astype(np.float64)),
        "accuracy_before": ("target", before["suffix_accuracy"][rows].astype(np.float64)),
        "test_loss_before": ((), float(test_before[0].mean())),
        "test_accuracy_before": ((), float(test_before[1].mean())),
        "kind": ("target", np.asarray(data.kind[rows], dtype=str))})
    coords = {"method": chosen, "fraction": np.asarray(fracs, dtype=np.float64),
              "target": ids}
    return Result("del", xr.Dataset(variables, coords=coords), config=config)


_PER = ("method", "fraction", "target")
#: what DEL measures per (method, fraction, target)
_MEASURED = ("loss", "accuracy", "memorised", "kept", "test_loss", "test_accuracy")

ANALYSIS = Analysis(
    name="del", order=159, compute=del_benchmark, plot=plot_del,
    schema=Schema("del", "DEL, deleting naturally memorised sequences by zeroing each localisation method's top "
                  "neurons (memloc.del_benchmark)",
  {"method": Var(("method",), "localisation method (memloc.localise_neurons)"),
   "fraction": Var(("fraction",), "share of each layer's neurons (config units heads: heads) zeroed (at least one)"),
   "target": Var(("target",), "sequence id of the memorised target")},
  {"memorised": Var(_PER, "the target's suffix is still reproduced after zeroing"),
   "accuracy": Var(_PER, "the target's suffix token accuracy after zeroing"),
   "loss": Var(_PER, "the target's suffix loss after zeroing (nats per token)"),
   "kept": Var(_PER, "specificity: share of the other memorised sequences still reproduced (NaN: none other)"),
   "test_loss": Var(_PER, "mean suffix loss of the test sequences after zeroing"),
   "test_accuracy": Var(_PER, "mean suffix token accuracy of the test sequences after zeroing"),
   "zeroed": Var(("fraction",), "neurons (config units heads: heads) zeroed in every layer"),
   "seconds": Var(("method",), "localisation seconds per target"),
   "loss_before": Var(("target",), "the target's suffix loss before zeroing"),
   "accuracy_before": Var(("target",), "the target's suffix token accuracy before zeroing"),
   "test_loss_before": Var((), "mean suffix loss of the test sequences before zeroing"),
   "test_accuracy_before": Var((), "mean suffix token accuracy of the test sequences before zeroing"),
   "kind": Var(("target",), "noisy | backdoor | canary | duplicate")}),
)
