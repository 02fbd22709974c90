"""Zero-Out (MemPi's fast_zero_out_vector): the increase of the target's suffix loss when one neuron is
zeroed alone, for every neuron; the ablations run ``eval_batch_size`` at a time, one per row."""
from __future__ import annotations

import torch

from .common import Targets, suffix_loss

__all__ = ["zero_out"]


@torch.no_grad()
def zero_out(t: Targets, opts: dict) -> torch.Tensor:
    """(B, L, d) float64: suffix loss with neuron (l, j) zeroed minus the loss with none zeroed."""
    n_rows, n_layers, d = t.shape
    out = torch.zeros(t.shape, dtype=torch.float64)
    base, _ = suffix_loss(t, t.tokens)
    units = torch.arange(n_layers * d)
    for b in range(n_rows):
        x = t.tokens[b:b + 1]
        for chunk in units.split(t.eval_batch_size):
            masks = t.ones(len(chunk)).view(len(chunk), -1)
            masks[torch.arange(len(chunk)), chunk] = 0
            loss, _ = suffix_loss(t, x.expand(len(chunk), -1), masks.view(-1, n_layers, d))
            out.view(n_rows, -1)[b, chunk] = (loss - base[b]).double().cpu()
    return out
