"""Integrated gradients (IG; MemPi's knowledge-neuron baseline) of the target's suffix log-likelihood
with respect to one MLP layer's neuron activations, by captum's ``IntegratedGradients``.

For layer l, F(h) = -suffix loss when layer l's activations (every position of the teacher-forced
input) are replaced by ``h``; the attribution of neuron j is the integral of dF/dh along the straight
path from h = 0 to the real activations, times the activations (captum, ``n_steps`` points of the
``method`` rule, ``eval_batch_size`` points per pass), summed over positions. The attributions of a
layer add up to F(h) - F(0) (completeness). MemPi scales one position at a time and attributes the
target token's probability; a whole-layer path of the suffix log-likelihood needs one integral per
layer instead of one per layer and suffix token. An attention head's attribution (``units="heads"``)
is the sum of its head_dim features' attributions (the path scales the output projection's input).
"""
from __future__ import annotations

import torch

from ...core.lm import lm_logits, suffix_measures
from ...core.neurons import neuron_hooks
from .common import Targets

__all__ = ["ig"]


def _activations(t: Targets, x: torch.Tensor) -> list[torch.Tensor]:
    acts = [None] * len(t.layers)

    def record(index, h):
        acts[index] = h.detach()
    with torch.no_grad(), neuron_hooks(t.model, t.layers, record):
        lm_logits(t.model, x[:, :-1])
    return acts


def ig(t: Targets, opts: dict) -> torch.Tensor:
    """(B, L, d) float64 (module docstring)."""
    from captum.attr import IntegratedGradients
    out = torch.zeros(t.shape, dtype=torch.float64)
    for b in range(len(t.tokens)):
        x = t.tokens[b:b + 1]
        acts = _activations(t, x)
        for layer in range(len(t.layers)):
            def forward(h, tokens, layer=layer):
                def replace(index, current):
                    return h.to(current.dtype) if index == layer else None
                with neuron_hooks(t.model, t.layers, replace):
                    logits = lm_logits(t.model, tokens[:, :-1])
                return -suffix_measures(logits, tokens, t.prefix_len, t.suffix_len)[0]
            attr = IntegratedGradients(forward).attribute(
                acts[layer], baselines=torch.zeros_like(acts[layer]), additional_forward_args=(x,),
                n_steps=int(opts["n_steps"]), method=opts["method"], internal_batch_size=t.eval_batch_size)
            unit = t.layers[layer]          # a head's attribution: the sum over its head_dim features
            out[b, layer] = attr[0].sum(0).view(unit.size, unit.group).sum(1).double().cpu()
    return out
