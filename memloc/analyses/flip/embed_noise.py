"""Input noise for a language model's flip search: Gaussian noise on the token embeddings.

Maini et al. average the target's logits over copies of the input with Gaussian noise of norm
``noise_ratio x ||input||``. Token ids take no noise; their continuous counterpart is the output of
the token-embedding layer (before position embeddings are added), so a sequence's copies are the
token row itself whose token embeddings ``E`` (T, d) are replaced by ``E + z``, ``||z|| = noise_ratio
x ||E||`` per copy (:func:`memloc.analyses.flip.search.noisy_copies` on ``E``, seeded as the image
noise). The embedding layer is upstream of every unit and of every parameter the language model's
weight site zeroes, so ``E`` does not change during a search. The replacement is a forward hook on
the embedding module, removed on leaving :func:`replaced_embeddings` (also on error); reference
rows are never noised.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...core.errors import MemlocError
from ...core.units import Hooks

__all__ = ["token_embedding", "replaced_embeddings"]


def token_embedding(model: nn.Module, tokens: torch.Tensor, outputs) -> nn.Module:
    """The module that embeds ``model``'s token ids: ``get_input_embeddings()`` (``transformers``), else
    the one ``nn.Embedding`` whose input is the token rows in a forward ``outputs(model, tokens)``."""
    try:
        found = model.get_input_embeddings()
        if isinstance(found, nn.Module):
            return found
    except (AttributeError, NotImplementedError):
        pass
    seen = []
    with torch.no_grad(), Hooks() as h:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                h.forward(m, lambda mod, inp, out: seen.append((mod, inp[0])))
        outputs(model, tokens)
    found = [m for m, x in seen if x.shape[0] == tokens.shape[0] and x.dim() == 2]
    if len(found) != 1:
        raise MemlocError(f"noise_samples: {type(model).__name__} has {'no' if not found else 'more than one'} "
                          "nn.Embedding taking its token ids, the input embeddings that a language model's noise is "
                          "added to; use {noise_samples}", options={"noise_samples": 0}, argument="noise_samples")
    return found[0]


@contextlib.contextmanager
def replaced_embeddings(module: nn.Module, emb: torch.Tensor):
    """Inside the block, each call of ``module`` returns ``emb`` (n, T, d) in place of its first n rows;
    a forward in the block that never called it raises (no silent noise-free search)."""
    calls = []

    def hook(mod, inp, out):
        calls.append(1)
        if out.shape[0] < len(emb) or tuple(out.shape[1:]) != tuple(emb.shape[1:]):
            raise ValueError(f"token embeddings of shape {tuple(out.shape)} cannot take noised rows {tuple(emb.shape)}")
        return torch.cat([emb.to(out.dtype), out[len(emb):]])

    with Hooks() as h:
        h.forward(module, hook)
        yield
    if not calls:
        raise RuntimeError("the token-embedding module was not called: its rows took no noise")
