"""What every neuron-localisation method shares: the target batch, the suffix loss under neuron masks,
the methods' names and their default hyper-parameters (one commented dict)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...core.lm import lm_logits, suffix_measures
from ...core.neurons import NeuronLayer, neuron_masks

__all__ = ["METHODS", "HYPER", "Targets", "suffix_loss", "greedy_budget"]

#: every method, in the order results list them
METHODS = ("zero_out", "activations", "ig", "slimming", "hard_concrete", "grad_x_act", "greedy", "random")

#: default hyper-parameters per method. MemPi's (Chang et al. 2024, github terarachang/MemPi) are its
#: settings for GPT-2 in script/ecbd/*.sh (INJ): Slimming lr 5e-3, lambda 15000, stop once the mean
#: mask is below 0.2; Hard Concrete lr 1e-2, lambda 1000, initial keep probability 0.5, temperature
#: 0.33, stop once the expected L0 share is below 0.4; both Adam, at most 4000 steps, the stop
#: tested every 10 steps; IG 20 steps (its ig_steps).
HYPER = {
    "zero_out": {},
    "activations": {},
    "ig": {"n_steps": 20, "method": "gausslegendre"},           # captum's Gauss-Legendre rule, MemPi's step count
    "slimming": {"lr": 5e-3, "lambda_l1": 15000.0, "stop_loss": 0.2, "max_steps": 4000, "check_every": 10},
    "hard_concrete": {"lr": 1e-2, "lambda_l0": 1000.0, "stop_loss": 0.4, "mask_p": 0.5, "beta": 0.33,
                      "limits": (-0.1, 1.1), "max_steps": 4000, "check_every": 10},
    "grad_x_act": {},
    "greedy": {"max_zeroed": 64,                 # zero at most this many neurons per target
               "min_zeroed": "auto",             # go on past the break until this many are zeroed; "auto": the
                                                 # top_k x layers the ranking is read at (greedy_budget); 0: stop
                                                 # at the break
               "reference_weight": 1.0},         # weight of the reference sequences' loss (when given)
    "random": {},
}


def greedy_budget(min_zeroed, n_layers: int, d: int, top_k: int | None = None) -> int:
    """greedy's ``min_zeroed`` as a count: an integer as given; ``"auto"``: ``top_k`` x ``n_layers``, the units
    a per-layer top-k of its ranking reads (INJ: the neurons injected per layer; DEL: its largest count; None:
    1% of a layer's ``d`` units, at least one, MemPi's largest DEL share), so that greedy orders them itself
    instead of leaving all but the first few to the gradient at the break."""
    if min_zeroed == "auto":
        return int(n_layers * (max(1, round(0.01 * d)) if top_k is None else top_k))
    return int(min_zeroed)


@dataclass
class Targets:
    """Target sequences ``tokens`` (B, prefix_len + suffix_len) of ``model`` (on its device, eval
    mode) with its unit ``layers`` (MLP neurons or attention heads, all of one width ``d``), and optionally ``reference`` sequences
    (R, prefix_len + suffix_len) whose suffix loss greedy keeps low. ``precision``: what the methods run in
    (:func:`memloc.analyses.localise.neuron_scores` runs them under its autocast; the learned masks scale
    their fp16 loss). ``ids``: each row's key of its random stream (:meth:`row_seed`; None: its position)."""

    model: nn.Module
    layers: list[NeuronLayer]
    tokens: torch.Tensor
    prefix_len: int
    suffix_len: int
    eval_batch_size: int = 64
    seed: int = 0
    reference: torch.Tensor | None = None
    precision: str = "fp32"
    ids: Sequence[int] | None = None

    def row_seed(self, row: int) -> int:
        """The seed of ``row``'s random stream, ``seed + 2**32 x id`` (the row's id; ``seed`` itself for id 0):
        a target draws the same numbers whichever targets share its batch (and whichever process computes it,
        under torchrun)."""
        return self.seed + (int(row if self.ids is None else self.ids[row]) << 32)

    @property
    def d(self) -> int:
        return self.layers[0].size

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, L, d): the shape of every method's scores."""
        return len(self.tokens), len(self.layers), self.d

    def ones(self, rows: int | None = None) -> torch.Tensor:
        """All-ones masks (rows, L, d) in the model's dtype, on its device."""
        p = next(self.model.parameters())
        return torch.ones(len(self.tokens) if rows is None else rows, len(self.layers), self.d,
                          dtype=p.dtype, device=p.device)


def suffix_loss(t: Targets, tokens: torch.Tensor, masks: torch.Tensor | None = None):
    """(loss, memorised), tensors (B,): the mean cross-entropy of each row's suffix and whether greedy
    decoding reproduces it, teacher-forced, with the neurons scaled by ``masks`` (B, L, d) if given."""
    if masks is None:
        logits = lm_logits(t.model, tokens[:, :-1])
    else:
        with neuron_masks(t.model, t.layers, masks):
            logits = lm_logits(t.model, tokens[:, :-1])
    loss, _, memorised = suffix_measures(logits, tokens, t.prefix_len, t.suffix_len)
    return loss, memorised
