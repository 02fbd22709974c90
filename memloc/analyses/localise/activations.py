"""Activations (MemPi's largest_act): how strongly each neuron fires while the model predicts the
target's suffix, weighted by the size of what it writes: |mean over the suffix-predicting positions of
its activation| x the L2 norm of its output weights (the down-projection column)."""
from __future__ import annotations

import torch

from ...core.lm import lm_logits
from ...core.neurons import neuron_hooks, output_weights
from .common import Targets

__all__ = ["activations"]


@torch.no_grad()
def activations(t: Targets, opts: dict) -> torch.Tensor:
    """(B, L, d) float64 (module docstring); the positions are those whose logits predict the suffix,
    ``prefix_len - 1 .. prefix_len + suffix_len - 2``."""
    lo, hi = t.prefix_len - 1, t.prefix_len + t.suffix_len - 1
    norms = []
    for layer in t.layers:
        weight, dim = output_weights(t.model, layer)
        norms.append(weight.detach().double().norm(dim=1 - dim).cpu())
    norms = torch.stack(norms)                                   # (L, d)
    out = []
    for x in t.tokens.split(t.eval_batch_size):
        means = [None] * len(t.layers)

        def record(index, h):
            means[index] = h[:, lo:hi].double().mean(1).cpu()    # (b, d)
        with neuron_hooks(t.model, t.layers, record):
            lm_logits(t.model, x[:, :-1])
        out.append(torch.stack(means, 1).abs() * norms)
    return torch.cat(out)
