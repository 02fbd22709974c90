"""INJ, the known-answer benchmark of neuron localisation (after MemPi, Chang et al. NAACL 2024).

``memloc.inj_benchmark(run_or_model, data=None, *, n_sequences=8, n_injected=2, methods=METHODS)``:

1. draw ``n_sequences`` new random sequences of ``prefix_len + suffix_len`` tokens (uniform over the
   token ids that occur in the training data; ``seed``), none reproduced by the model;
2. for each, choose ``n_injected`` random neurons in every MLP layer (MemPi: a random 0.1% of all
   neurons; a fixed count per layer suits small models) and fine-tune only their output weights (the
   down-projection's input columns; Adam, ``lr``; every other weight is left bit for bit) on the
   sequence's suffix loss until greedy decoding reproduces the suffix (at most ``max_steps`` steps).
   Those neurons are the ground truth. ``units="heads"``: attention heads instead
   (:func:`memloc.core.neurons.attention_heads`), a head's output weights being the output projection's
   input columns of its slice (head_dim of them), as :func:`memloc.localise_neurons` ranks them;
3. run every localisation method (:func:`memloc.neuron_scores`) on the injected model and the
   sequence, and score its top-k neurons of each layer (k = the number injected there) by recall:
   the share of the injected neurons among them (greedy, at its default, carries on until it has
   zeroed k x layers neurons). Then restore the original weights.

The ``"inj"`` result: ``recall`` (method, sequence, layer) and ``seconds`` (method, sequence), the
injected neurons, the fine-tuning steps and whether injection succeeded (sequences whose injection
failed are not localised: NaN recall). The random baseline's expected recall is k / d_mlp (heads: k /
n_head). The config records ``units`` and the units of a layer (``d_mlp``, or ``n_head`` for heads).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import xarray as xr

from ..core.errors import MemlocError
from ..core.neurons import output_weights, unit_layers
from ..core.optim import make_optimizer
from ..core.precision import autocast, check_precision, grad_scaler
from ..core.registry import Analysis
from ..core.results import Result
from ..core.runtime import check_choices, check_range
from ..core.schemas import Schema, Var
from ..core.store import stored
from ..core.selection import lm_source
from ..scale.distributed import world
from ..scale.parts import Columns, split_rows
from .localise import METHODS, method_options, neuron_scores, reference_rows, resolved_options, target_parts
from .localise.methods import check_localised_units
from .localise.common import Targets, suffix_loss
from .localise.plots import plot_inj

__all__ = ["inj_benchmark", "inject_sequence", "recall_at_k"]


def inject_sequence(model, tokens: torch.Tensor, prefix_len: int, suffix_len: int, neurons, *, lr: float = 0.05,
                    max_steps: int = 500, precision: str = "fp32", units: str = "mlp") -> tuple[int, bool]:
    """Fine-tune the output weights of ``neurons`` ((L, k) indices per MLP layer; ``units="heads"``: per
    attention layer, each head's head_dim input columns of the output projection) of ``model`` in place
    until it reproduces the suffix of ``tokens`` (1, T) from its prefix: (steps taken, memorised).
    ``precision``: the forward passes under autocast, the fp16 loss scaled (:mod:`memloc.core.precision`)."""
    layers = unit_layers(model, check_localised_units(units))
    t = Targets(model, layers, tokens, prefix_len, suffix_len)
    weights, keep = [], []
    for layer, chosen in zip(layers, neurons):
        weight, dim = output_weights(model, layer)
        mask = torch.zeros(layer.size, dtype=weight.dtype, device=weight.device)
        mask[torch.as_tensor(chosen, device=weight.device)] = 1
        mask = mask.repeat_interleave(layer.group)      # a head: its head_dim features (a neuron: itself)
        weights.append(weight)
        keep.append(mask.view(-1, 1) if dim == 0 else mask.view(1, -1))
    optimiser = make_optimizer(weights, "adam", lr=lr, weight_decay=0.0)    # = Adam
    scaler = grad_scaler(precision, tokens.device)      # fp16 only; otherwise the plain gradient and step
    for step in range(max_steps + 1):
        with autocast(precision, tokens.device):
            loss, memorised = suffix_loss(t, tokens)
        if bool(memorised.all()) or step == max_steps:
            return step, bool(memorised.all())
        grads = torch.autograd.grad(scaler.scale(loss.sum()), weights)
        for w, g, m in zip(weights, grads, keep):
            w.grad = g * m                    # only the chosen columns move (Adam leaves zero-gradient entries)
        scaler.step(optimiser)
        scaler.update()
    return max_steps, False


def recall_at_k(scores: np.ndarray, neurons: np.ndarray) -> np.ndarray:
    """(L,) recall of the top-k of each layer's ``scores`` (L, d) against ``neurons`` (L, k) (ties: lower index)."""
    k = neurons.shape[1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.asarray([len(np.intersect1d(a, b)) / k for a, b in zip(top, neurons)], dtype=np.float64)


@stored("inj")
def inj_benchmark(source, data=None, *, n_sequences: int = 8, n_injected: int = 2, methods=METHODS,
                  prefix_len: int | None = None, suffix_len: int | None = None, options: dict | None = None,
                  ref_batch_size: int = 8, lr: float = 0.05, max_steps: int = 500, checkpoint: int | None = None,
                  eval_batch_size: int = 64, seed: int = 0, device="auto", precision: str = "fp32", units: str = "mlp",
                  resume=None, overwrite: bool = False) -> Result | None:
    """The ``"inj"`` result (module docstring) of a language-model run (``checkpoint`` default final) or
    a causal LM module with ``data`` (its SequenceSet gives the token ids to draw from, and the span
    unless ``prefix_len`` / ``suffix_len`` are given; greedy keeps the loss of ``ref_batch_size`` of its
    clean training sequences low). ``precision``: the injection's and the localisation's forward passes
    under autocast, the injection's fp16 loss scaled (:mod:`memloc.core.precision`). ``resume`` /
    ``overwrite`` and torchrun as :func:`memloc.localise_neurons`: each sequence (drawn from ``seed``, its
    localisation seeded ``seed`` + its number) is one part, claimed by whichever process is free. ``units``:
    inject into and rank the MLP neurons (``"mlp"``) or the attention heads (``"heads"``; module docstring)."""
    n_sequences, n_injected, max_steps = (check_range(name, value, low=1, integer=True) for name, value in (
        ("n_sequences", n_sequences), ("n_injected", n_injected), ("max_steps", max_steps)))
    lr = check_range("lr", lr, low=0, low_open=True)
    seed = check_range("seed", seed, low=0, integer=True)
    check_precision(precision)
    chosen = check_choices("methods", methods, METHODS, "localisation method")
    check_localised_units(units)
    method_options(options)
    folder = target_parts(source, resume, "inj")
    model, data, epoch = lm_source(source, data, checkpoint=checkpoint, device=device, analysis="inj_benchmark")
    layers = unit_layers(model, units)
    d, what = layers[0].size, ("heads" if units == "heads" else "neurons")
    if n_injected >= d:
        raise MemlocError(f"n_injected {n_injected} is {'all' if n_injected == d else 'more than'} the {d} {what} of a "
                          f"layer: every method's recall would be 1; inject fewer", argument="n_injected")
    p = data.prefix_len if prefix_len is None else prefix_len
    s = data.suffix_len if suffix_len is None else suffix_len
    p = check_range("prefix_len", p, low=1, integer=True)
    s = check_range("suffix_len", s, low=1, integer=True)
    dev = next(model.parameters()).device
    check_precision(precision, dev)
    rng = np.random.default_rng(seed)
    vocab = np.unique(data.tokens.numpy())
    tokens = torch.from_numpy(rng.choice(vocab, size=(n_sequences, p + s))).long()
    neurons = np.stack([np.stack([np.sort(rng.choice(d, n_injected, replace=False)) for _ in layers])
                        for _ in range(n_sequences)])                                   # (n, L, k)
    ref = reference_rows(data, ref_batch_size, seed=seed)
    reference = data.tokens[torch.as_tensor(ref)].to(dev) if len(ref) else None
    original = [output_weights(model, layer)[0].detach().clone() for layer in layers]
    columns = Columns(recall=(len(chosen), len(layers)), seconds=(len(chosen),), inject_seconds=(), steps=(), ok=(),
                      before=(), greedy_zeroed=())

    def work(chunk):        # one sequence: injected, localised if that made it memorised, the weights restored
        i = int(chunk[0])
        x = tokens[i:i + 1].to(dev)
        with torch.no_grad(), autocast(precision, dev):
            before = bool(suffix_loss(Targets(model, layers, x, p, s), x)[1].all())
        recall, greedy_zeroed = np.full((len(chosen), len(layers)), np.nan), -1
        seconds = np.full(len(chosen) + 1, np.nan)          # the methods', then the injection's (NaN: not localised)
        try:
            start = time.perf_counter()
            steps, ok = inject_sequence(model, x, p, s, neurons[i], lr=lr, max_steps=max_steps, precision=precision,
                                        units=units)
            inject_seconds = time.perf_counter() - start
            if ok and not before:
                got = neuron_scores(model, x, p, s, methods=chosen, reference=reference, options=options,
                                    eval_batch_size=eval_batch_size, seed=seed + i, precision=precision, units=units,
                                    top_k=n_injected)
                greedy_zeroed = got["greedy_zeroed"][0] if "greedy" in chosen else -1
                recall = np.stack([recall_at_k(got["scores"][m][0], neurons[i]) for m in chosen])
                seconds = np.asarray([got["seconds"][m] for m in chosen] + [inject_seconds])
        finally:
            with torch.no_grad():
                for layer, w in zip(layers, original):
                    output_weights(model, layer)[0].copy_(w)
        return columns.pack(recall=recall[None], seconds=seconds[None, :-1], inject_seconds=seconds[-1:], steps=[steps],
                            ok=[ok], before=[before], greedy_zeroed=[greedy_zeroed])
    config = {"methods": chosen, "options": resolved_options(options, chosen, len(layers), d, n_injected),
              "n_sequences": n_sequences,
              "n_injected": n_injected, "lr": lr, "max_steps": max_steps, "checkpoint": epoch, "prefix_len": p,
              "suffix_len": s, "reference": [int(i) for i in data.ids[ref]],
              ("n_head" if units == "heads" else "d_mlp"): d,
              "eval_batch_size": eval_batch_size, "seed": seed, "device": str(dev),
              "data": data.name, "precision": precision, "units": units}
    got = columns.unpack(split_rows(n_sequences, 1, work, folder=folder, what="inj",
                                    settings={**config, "device": dev.type}, overwrite=overwrite))
    localised = (got["ok"] > 0) & (got["before"] == 0)
    if not localised.any():
        raise MemlocError(f"no sequence was injected (none memorised within max_steps={max_steps} steps at "
                          f"lr={lr}): raise max_steps or lr", argument="max_steps")
    if world()[0] > 0:
        return None             # rank 0 returns the merged result
    variables = {"recall": (("method", "sequence", "layer"), got["recall"].transpose(1, 0, 2)),
                 "seconds": (("method", "sequence"), got["seconds"].T),
                 "inject_seconds": ("sequence", got["inject_seconds"]),
                 "injected": (("sequence", "layer", "slot"), neurons.astype(np.int64)),
                 "inject_steps": ("sequence", got["steps"].astype(np.int64)), "injected_ok": ("sequence", localised),
                 "tokens": (("sequence", "position"), tokens.numpy())}
    if "greedy" in chosen:
        variables["greedy_zeroed"] = ("sequence", got["greedy_zeroed"].astype(np.int64))
    coords = {"method": chosen, "sequence": np.arange(n_sequences), "layer": [layer.name for layer in layers],
              "slot": np.arange(n_injected), "position": np.arange(p + s)}
    return Result("inj", xr.Dataset(variables, coords=coords), config=config)


ANALYSIS = Analysis(
    name="inj", order=158, compute=inj_benchmark, plot=plot_inj,
    schema=Schema("inj", "INJ, the known-answer benchmark of neuron localisation: recall of injected neurons "
                  "(memloc.inj_benchmark)",
  {"method": Var(("method",), "localisation method (memloc.localise_neurons)"),
   "sequence": Var(("sequence",), "injected random sequence"),
   "layer": Var(("layer",), "MLP layer (its down-projection); config units heads: attention layer (its output "
                            "projection)"),
   "slot": Var(("slot",), "injected neuron (config units heads: head) of a layer"),
   "position": Var(("position",), "token position")},
  {"recall": Var(("method", "sequence", "layer"), "share of the injected neurons among the method's top-k of the "
                 "layer (k = injected per layer); NaN where injection failed"),
   "seconds": Var(("method", "sequence"), "seconds the method took for the sequence"),
   "inject_seconds": Var(("sequence",), "seconds the injection (fine-tuning) took"),
   "injected": Var(("sequence", "layer", "slot"), "the injected neurons or heads (the ground truth)"),
   "inject_steps": Var(("sequence",), "fine-tuning steps until the suffix was reproduced"),
   "injected_ok": Var(("sequence",), "the sequence was new and got memorised by the injection"),
   "tokens": Var(("sequence", "position"), "the injected sequence (prefix, then suffix)"),
   "greedy_zeroed": Var(("sequence",), "neurons greedy zeroed until the suffix broke (-1: not localised)",
                        optional=True)}),
)
