"""The mitigation methods: each edits a copy of the model so that it no longer reproduces ALL its
memorised targets at once, keeping its other sequences (TinyMem's protocol, Sakarvadia et al. 2025).

- ``balanced_subnet`` / ``subnet``: TinyMem's learned masks over MLP weights (:mod:`.subnet`); ``fraction``
  = the share of each MLP matrix's weights pruned.
- ``zero_out``, ``activations``, ``ig``, ``slimming``, ``hard_concrete``, ``grad_x_act``, ``random``:
  memloc's neuron localisation (:func:`memloc.neuron_scores`, MemPi's methods) run on every memorised
  target; a neuron's score for the set is its mean score over the targets (for Zero-Out, IG, Activations
  and gradient x activation exactly the score of the targets' mean loss, which TinyMem localises; for
  the learned masks the mean of the per-target masks); the top ``fraction`` of every layer's neurons
  (at least one) are zeroed (their output weights set to 0).
- ``greedy``: memloc's gradient-guided neuron zeroing run on all targets at once: one mask (L, d)
  shared by every sequence; repeat: stop when no target is reproduced (or ``fraction`` of all
  neurons are zeroed), else zero the neuron whose first-order estimate -m dO/dm is largest, O = the
  mean suffix loss of the targets still reproduced - ``reference_weight`` x the mean suffix loss of the
  clean reference sequences (raise the targets' loss, keep the clean one low).
- ``greedy_weights``: the same search on single MLP weights (:func:`.subnet.mlp_weights`): estimate
  -w dO/dw, ``per_step`` x (all MLP weights) zeroed per step, at most ``fraction`` of them. Its clean
  term (``clean="rotate"``) is a new batch each step of as many sequences as the reference
  (``ref_batch_size``), drawn in turn from every clean training sequence (an order drawn from ``seed``,
  every one once per round, :func:`clean_batches`); ``clean="fixed"``: the reference at every step, as
  ``greedy`` does. A fixed reference lets the search fit those sequences: over eight draws on
  lm_mitigation.py's runs, measured on 1,953 fresh test sequences (artifacts/lm_mitigation_speed.md),
  the held-out token accuracy fell by 0.92 points on average (TinyGPT; GPT-2 config 1.81) with a fixed
  reference and ``reference_weight`` 30 (the earlier default), by 0.68 (1.75) with batches in turn and
  ``reference_weight`` 10 (the default), at 1.7x (1.4x) the CPU time.
- ``fine_tune_greedy`` (memloc's best on those runs): ``fine_tune`` (Adam at ``lr``) on the clean
  training sequences for ``max_epochs`` (fewer once no target is reproduced), each step also raising the
  suffix loss of the targets the model still reproduces (``ascent_weight`` x their mean suffix loss
  subtracted from the clean loss, measured in eval mode; a target leaves the ascent for the rest of the
  epoch as soon as it is no longer reproduced; 0: fine-tuning alone), then ``greedy_weights`` (its own
  ``reference_weight``, ``per_step`` and ``clean``) on any target still reproduced; ``changed``: the
  weights zeroed (none in most draws of artifacts/lm_mitigation_speed.md). Fine-tuning alone leaves a
  few targets, which the greedy phase then prunes at some cost in held-out accuracy and time; the ascent
  removes them while the fine-tuning raises the held-out accuracy (that table's "no ascent" row); the
  clean training sequences still reproduced are about as many with it as without. ``lr`` is a fixed default
  (0.003, the benchmark runs' own), not read from the run: set it near the run's.
- ``fine_tune``: Adam on every weight, next-token loss on the clean training sequences (all
  non-target ones), whole epochs until no target is reproduced or ``max_epochs``; ``fraction`` unused.
- ``sinks`` (not among the defaults, :data:`CHOICES`): a run trained with memorisation sinks (``train
  --etd-after mlp``, :mod:`memloc.core.dropout.sinks`) measured with its sink neurons dropped and the
  others scaled by (p_gen + p_mem) / p_gen (``drop`` mode) instead of the sinks scaled by ``p_mem``
  (``test`` mode, the model "before"); ``fraction`` unused; changed: the sink neurons dropped. A model
  without sinks is refused.

``units="heads"`` (:data:`UNIT_METHODS`: the neuron localisation methods and ``greedy``): the same
ranking and zeroing over attention heads (:func:`memloc.core.neurons.attention_heads`; a head is zeroed
by setting its slice of the output projection's input columns to 0). BalancedSubnet, Subnet and
``greedy_weights`` prune single MLP weights, ``fine_tune`` trains every weight (``fine_tune_greedy``
then prunes MLP weights) and ``sinks`` drops MLP sink neurons: none of them chooses units, so they are
refused with heads (:func:`check_method_units`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import MemlocError
from ...core.lm import lm_logits, sequence_measures, suffix_measures
from ...core.neurons import NeuronLayer, neuron_masks, output_weights, unit_layers
from ...core.optim import make_optimizer
from ...core.precision import autocast, grad_scaler
from ..localise import METHODS as LOCALISE, method_options as localise_options, neuron_scores
from ..localise.methods import check_settings
from .subnet import HYPER as SUBNET, mlp_weights, subnet

__all__ = ["METHODS", "CHOICES", "UNIT_METHODS", "HYPER", "Task", "FUNCTIONS", "mitigation_options", "zero_neurons",
           "check_sinks", "check_method_units", "default_methods"]

NEURON_METHODS = tuple(m for m in LOCALISE if m != "greedy")
#: every method, in the order results list them
METHODS = ("balanced_subnet", "subnet", "hard_concrete", "slimming", "zero_out", "ig", "activations", "grad_x_act",
           "greedy", "greedy_weights", "fine_tune_greedy", "random", "fine_tune")
#: every method a caller may choose: the defaults and ``sinks`` (only for a model trained with sinks)
CHOICES = (*METHODS, "sinks")
#: methods whose edit does not depend on ``fraction``
NO_FRACTION = ("fine_tune", "sinks")
#: the methods that rank and zero units, so that take ``units="heads"`` as well as ``"mlp"``
UNIT_METHODS = tuple(m for m in METHODS if m in (*NEURON_METHODS, "greedy"))

#: default hyper-parameters of the methods of this module; the neuron methods take
#: :data:`memloc.analyses.localise.HYPER`'s (``options`` sets either)
HYPER = {"balanced_subnet": dict(SUBNET), "subnet": dict(SUBNET),
         "greedy": {"reference_weight": 1.0},
         "greedy_weights": {"reference_weight": 10.0, "per_step": 0.0002, "clean": "rotate"},
         "fine_tune_greedy": {"lr": 3e-3, "batch_size": 32, "max_epochs": 6, "ascent_weight": 0.3, "reference_weight": 10.0,
                              "per_step": 0.0004, "clean": "rotate"},
         "fine_tune": {"lr": 1e-3, "batch_size": 32, "max_epochs": 10}, "sinks": {}}


def mitigation_options(options: dict | None) -> dict[str, dict]:
    """Every method's settings: :data:`HYPER` and the localisation methods' with ``options`` laid over them."""
    if options is not None and not isinstance(options, dict):
        raise MemlocError(f"options must be a dict {{method: {{setting: value}}}}, got {type(options).__name__}",
                          argument="options")
    options = dict(options or {})
    bad = sorted(set(options) - set(CHOICES))
    if bad:
        raise MemlocError(f"options names no mitigation method {bad[0]!r}; valid: {', '.join(CHOICES)}",
                          argument="options")
    merged = localise_options({m: v for m, v in options.items() if m in NEURON_METHODS})
    for method, defaults in HYPER.items():
        check_settings(method, options.get(method, {}), defaults)
        merged[method] = {**defaults, **options.get(method, {})}
        if merged[method].get("clean", "rotate") not in ("rotate", "fixed"):
            raise MemlocError(f"options for {method}: clean must be 'rotate' or 'fixed', not {merged[method]['clean']!r}",
                              argument="options")
    return {m: merged[m] for m in CHOICES}


def default_methods(units: str) -> tuple[str, ...]:
    """The methods ``mitigate`` runs when none are named: :data:`METHODS`, or with heads :data:`UNIT_METHODS`."""
    return METHODS if units == "mlp" else UNIT_METHODS


def check_method_units(chosen, units: str) -> None:
    """A one-line :class:`MemlocError` when a method of ``chosen`` does not choose units of kind ``units``."""
    bad = [m for m in chosen if units != "mlp" and m not in UNIT_METHODS]
    if bad:
        raise MemlocError(f"methods {', '.join(bad)} with units={units!r}: balanced_subnet and subnet (TinyMem) and "
                          "greedy_weights prune MLP weights, fine_tune trains every weight, fine_tune_greedy trains "
                          "every weight and then prunes MLP weights, and sinks drops MLP neurons, so "
                          f"they choose no heads; with heads use {', '.join(UNIT_METHODS)}", argument="methods")


@dataclass
class Task:
    """What a method works on: ``model`` (a copy it edits in place, eval mode), every memorisation target
    ``targets`` on the model's device (of which ``was_memorised`` (B,) bool the model reproduced before) and
    the ``clean`` reference sequences (prefix + suffix, on the model's device), every clean training sequence
    ``clean_all`` (whole, on the device), the span, the batch size, the seed and the precision of every
    forward pass (:mod:`memloc.core.precision`; fp16 training steps scale their loss), and the kind of
    ``units`` the unit methods rank and zero (``"mlp"`` or ``"heads"``)."""

    model: nn.Module
    targets: torch.Tensor
    was_memorised: torch.Tensor
    clean: torch.Tensor
    clean_all: torch.Tensor
    prefix_len: int
    suffix_len: int
    eval_batch_size: int = 64
    seed: int = 0
    precision: str = "fp32"
    units: str = "mlp"

    @property
    def layers(self) -> list[NeuronLayer]:
        return unit_layers(self.model, self.units)

    def memorised(self) -> np.ndarray:
        return sequence_measures(self.model, self.targets, self.prefix_len, self.suffix_len,
                                 eval_batch_size=self.eval_batch_size, precision=self.precision)["memorised"]


@torch.no_grad()
def zero_neurons(model: nn.Module, layers: list[NeuronLayer], zeroed: torch.Tensor) -> None:
    """Set the output weights of the units where ``zeroed`` (L, d) is true to 0 (the same as zeroing them; a
    head's: its head_dim input columns of the output projection)."""
    for layer, rows in zip(layers, zeroed.to(torch.bool)):
        weight, dim = output_weights(model, layer)
        features = rows[:layer.size].repeat_interleave(layer.group)
        weight.index_fill_(dim, torch.nonzero(features.to(weight.device)).flatten(), 0.0)


def _neurons(method: str):
    def run(t: Task, opts: dict, fraction: float) -> int:
        layers = t.layers
        got = neuron_scores(t.model, t.targets[t.was_memorised], t.prefix_len, t.suffix_len, methods=[method],
                            reference=t.clean if len(t.clean) else None, options={method: opts},
                            eval_batch_size=t.eval_batch_size, seed=t.seed, precision=t.precision,
                            units=t.units)["scores"][method].mean(0)   # (L, d)
        k = max(1, int(round(fraction * layers[0].size)))
        top = np.argsort(-got, axis=-1, kind="stable")[:, :k]
        zeroed = np.zeros(got.shape, dtype=bool)
        np.put_along_axis(zeroed, top, True, axis=-1)
        zero_neurons(t.model, layers, torch.from_numpy(zeroed))
        return int(zeroed.sum())
    return run


def _loss(t: Task, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(t.precision, x.device):
        logits = lm_logits(t.model, x[:, :-1])
    loss, _, memorised = suffix_measures(logits, x, t.prefix_len, t.suffix_len)
    return loss, memorised


def _search(t: Task, variables: list[torch.Tensor], context, weight: float, budget: int, per_step: int,
            clean=None) -> int:
    """Zero entries of ``variables`` (tensors requiring grad, read inside ``context()``) by the largest
    -v dO/dv, ``per_step`` at a time, until no target is reproduced or ``budget`` are zeroed; O = the mean
    suffix loss of the targets reproduced - ``weight`` x the mean suffix loss of the clean sequences
    ``clean(step)`` (default: the reference ``t.clean`` at every step)."""
    alive = [torch.ones_like(v, dtype=torch.bool) for v in variables]
    zeroed = step = 0
    while True:
        with torch.no_grad(), context():
            memorised = _loss(t, t.targets)[1]
        if not memorised.any() or zeroed >= budget:
            return zeroed
        batch = t.clean if clean is None else clean(step)
        step += 1
        with context():                          # the backward pass on the targets still reproduced alone
            objective = _loss(t, t.targets[memorised])[0].mean()
            if weight and len(batch):
                objective = objective - weight * _loss(t, batch)[0].mean()
        grads = torch.autograd.grad(objective, variables)
        estimate = torch.cat([(-(v * g)).detach().masked_fill(~a, -torch.inf).flatten()
                              for v, g, a in zip(variables, grads, alive)])
        picks = estimate.topk(min(per_step, budget - zeroed)).indices
        with torch.no_grad():
            start = 0
            for v, a in zip(variables, alive):
                here = picks[(picks >= start) & (picks < start + v.numel())] - start
                v.view(-1)[here] = 0
                a.view(-1)[here] = False
                start += v.numel()
        zeroed += len(picks)


def greedy(t: Task, opts: dict, fraction: float) -> int:
    layers = t.layers
    p = next(t.model.parameters())
    mask = torch.ones(len(layers), layers[0].size, dtype=p.dtype, device=p.device, requires_grad=True)
    budget = max(1, int(round(fraction * mask.numel())))
    n = _search(t, [mask], lambda: neuron_masks(t.model, layers, mask), float(opts["reference_weight"]), budget, 1)
    zero_neurons(t.model, layers, mask.detach() == 0)
    return n


def clean_batches(t: Task):
    """``step -> tokens``: the clean batches of :func:`greedy_weights`, ``len(t.clean)`` rows each (the
    reference's size) taken in turn from every clean training sequence ``t.clean_all`` (cut to prefix +
    suffix) in an order drawn from ``t.seed``, every sequence once per round."""
    pool = t.clean_all[:, :t.prefix_len + t.suffix_len]
    size = min(len(t.clean), len(pool))
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(t.seed))).to(pool.device)
    offsets = torch.arange(size, device=pool.device)
    return lambda step: pool[order[(offsets + step * size) % max(1, len(pool))]]


def greedy_weights(t: Task, opts: dict, fraction: float) -> int:
    weights = [module.weight for _, module in mlp_weights(t.model)]
    flags = [w.requires_grad for w in weights]
    total = sum(w.numel() for w in weights)
    try:
        for w in weights:
            w.requires_grad_(True)
        return _search(t, weights, contextlib.nullcontext, float(opts["reference_weight"]),
                       max(1, int(round(fraction * total))), max(1, int(round(float(opts["per_step"]) * total))),
                       clean_batches(t) if opts["clean"] == "rotate" else None)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)


def fine_tune_greedy(t: Task, opts: dict, fraction: float) -> int:
    """``fine_tune`` with the ascent on the targets (``ascent_weight``) for ``max_epochs`` (fewer once no target
    is reproduced), then ``greedy_weights`` on those still reproduced; returns the weights zeroed."""
    fine_tune(t, opts, fraction)
    return greedy_weights(t, opts, fraction)


def _subnet(balanced: bool):
    def run(t: Task, opts: dict, fraction: float) -> int:
        return subnet(t.model, t.targets, t.clean, t.prefix_len, t.suffix_len, sparsity=fraction, balanced=balanced,
                      opts=opts, seed=t.seed, precision=t.precision)
    return run


def fine_tune(t: Task, opts: dict, fraction: float) -> int:
    """Adam on the clean training sequences, whole epochs until no target is reproduced or ``max_epochs``;
    with ``opts["ascent_weight"]`` (``fine_tune_greedy``'s) each step also raises the mean suffix loss of
    the targets reproduced at the epoch's start and by every ascent forward of the epoch so far (those
    forwards in eval mode, without dropout, as the targets are measured; one not reproduced stays out
    until the next epoch, and the fewer remain, the larger each one's share of the push). Returns the
    epochs run."""
    if not len(t.clean_all):
        raise MemlocError("there is no clean (non-target) training sequence to fine-tune on", argument="methods")
    params = [q for q in t.model.parameters() if q.requires_grad]
    optimiser = make_optimizer(params, "adam", lr=float(opts["lr"]), weight_decay=0.0)
    scaler = grad_scaler(t.precision, t.clean_all.device)      # fp16 only; otherwise the plain step
    order = torch.Generator().manual_seed(int(t.seed))
    ascent = float(opts.get("ascent_weight", 0.0))
    for epoch in range(int(opts["max_epochs"])):
        memorised = torch.as_tensor(t.memorised())
        if not memorised.any():
            return epoch
        active = torch.nonzero(memorised).flatten().to(t.targets.device)    # the targets ascended on this epoch
        t.model.train()
        for rows in torch.randperm(len(t.clean_all), generator=order).split(int(opts["batch_size"])):
            x = t.clean_all[rows.to(t.clean_all.device)]
            with autocast(t.precision, x.device):
                logits = lm_logits(t.model, x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
            if ascent and len(active):        # raise the loss of the targets the model still reproduces
                t.model.eval()                # as they are measured: without dropout
                target_loss, reproduced = _loss(t, t.targets[active])
                t.model.train()
                active = active[reproduced]
                if len(active):
                    loss = loss - ascent * target_loss[reproduced].mean()
            optimiser.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        t.model.eval()
    return int(opts["max_epochs"])


def check_sinks(model: nn.Module, what: str) -> dict:
    """The example-tied dropout layers of ``model`` (its sinks); a one-line :class:`MemlocError` naming
    ``what`` when it has none."""
    from ...core.dropout import dropout_layers
    layers = dropout_layers(model)
    if not layers:
        raise MemlocError(f"methods: sinks needs a run trained with memorisation sinks (train --etd-after mlp); {what} "
                          "has none", argument="methods")
    return layers


def sinks(t: Task, opts: dict, fraction: float) -> int:
    """Drop the sink neurons (``drop`` mode); returns how many there are."""
    from ...core.dropout import set_mode
    layers = check_sinks(t.model, "the model")
    sizes = {layer.name.rpartition(".")[0]: layer.size for layer in t.layers}
    units = [sizes.get(name.rpartition(".")[0], d.units_seen or 0) for name, d in layers.items()]
    set_mode(t.model, "drop")
    return sum(n - d.n_gen(n) for n, d in zip(units, layers.values()))


FUNCTIONS = {"balanced_subnet": _subnet(True), "subnet": _subnet(False), "greedy": greedy,
             "greedy_weights": greedy_weights, "fine_tune_greedy": fine_tune_greedy, "fine_tune": fine_tune,
             "sinks": sinks,
             **{m: _neurons(m) for m in NEURON_METHODS}}
