"""Activations (MemPi's largest_act): how strongly each neuron fires while the model predicts the
target's suffix, weighted by the size of what it writes: |mean over the suffix-predicting positions of
its activation| x the L2 norm of its output weights (the down-projection column). An attention head's
(``units="heads"``): the L2 norm of what its mean output writes, ``W_k mean(z_k)`` (``W_k``: the output
projection's columns of head k, ``z_k`` its head_dim features); for one neuron this is the same product."""
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
    columns = []                                                 # per layer (out, units, group)
    for layer in t.layers:
        weight, dim = output_weights(t.model, layer)
        w = weight.detach().double().cpu()
        columns.append((w if dim == 1 else w.T).reshape(-1, layer.size, layer.group))
    norms = torch.stack([c[..., 0].norm(dim=0) for c in columns]) if t.layers[0].group == 1 else None   # (L, d)
    out = []
    for x in t.tokens.split(t.eval_batch_size):
        means = [None] * len(t.layers)

        def record(index, h):
            means[index] = h[:, lo:hi].double().mean(1).cpu()    # (b, units x group)
        with neuron_hooks(t.model, t.layers, record):
            lm_logits(t.model, x[:, :-1])
        if norms is not None:
            out.append(torch.stack(means, 1).abs() * norms)
        else:
            out.append(torch.stack([torch.einsum("bkg,okg->bko", m.view(len(m), layer.size, layer.group), c).norm(dim=-1)
                                    for m, layer, c in zip(means, t.layers, columns)], 1))
    return torch.cat(out)
