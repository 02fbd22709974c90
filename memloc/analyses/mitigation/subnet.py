"""Learned masks over MLP weights, after TinyMem (Sakarvadia et al., ICLR 2025): Subnet and BalancedSubnet.

Every weight matrix of every MLP block (the up- and down-projections; a gated MLP's gate too: each 2-D
``weight`` under the module holding the down-projection, :func:`mlp_weights`) gets one score per
weight. The forward pass uses ``W * m`` with ``m`` the edge-popup mask (Ramanujan et al. 2020): 0 on
the ``sparsity`` share of the matrix's weights with the smallest |score|, 1 on the others; the
gradient reaches the scores straight through the mask (d loss / d |score| = d loss / d m). The
weights themselves are frozen. TinyMem's settings (:data:`HYPER`): scores drawn like a Kaiming-uniform
initialisation (uniform in +-1/sqrt(fan in)), SGD with lr 0.1, momentum 0.9, weight decay 5e-4,
batches of 64 sequences; 50 epochs (TinyMem: 5, over far more sequences than a small run's targets and
reference); the learned mask is then applied for good (the pruned weights set to 0).

- ``subnet``: the objective is minus the suffix loss of the memorised targets (raise it);
- ``balanced_subnet``: the targets and the clean sequences are shuffled into one set, each batch's
  objective is the mean over its sequences of -loss (a target) or +loss (a clean one): raise the
  targets' loss while keeping the clean loss low.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...core.lm import lm_logits, suffix_measures
from ...core.neurons import mlp_layers
from ...core.optim import make_optimizer
from ...core.precision import autocast, grad_scaler

__all__ = ["mlp_weights", "subnet", "HYPER"]

#: TinyMem's Subnet / BalancedSubnet settings (its weight-localisation code: SGD lr 0.1, momentum 0.9,
#: weight decay 5e-4, batch 64; 5 epochs there, 50 here: a few steps on a small run's sequences)
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "epochs": 50}


def mlp_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module with a 2-D ``weight`` inside each MLP block (the parent of a
    down-projection of :func:`memloc.core.neurons.mlp_layers`), in module order."""
    blocks = tuple(layer.name.rpartition(".")[0] + "." for layer in mlp_layers(model))
    return [(name, module) for name, module in model.named_modules()
            if name.startswith(blocks) and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.ndim == 2]


class _EdgePopup(nn.Module):
    """The parametrisation ``W -> W * m(scores)`` (module docstring)."""

    def __init__(self, shape, sparsity: float, generator: torch.Generator, device, dtype):
        super().__init__()
        bound = 1 / math.sqrt(shape[1] if len(shape) > 1 else shape[0])
        scores = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.scores = nn.Parameter(scores.to(device=device, dtype=dtype))
        self.pruned = int(sparsity * self.scores.numel())

    def mask(self) -> torch.Tensor:
        a = self.scores.abs()
        hard = torch.ones_like(a)
        if self.pruned:
            hard.view(-1)[a.detach().view(-1).argsort()[:self.pruned]] = 0
        return hard + (a - a.detach())            # straight through: d m / d |score| = 1; exactly hard

    def forward(self, weight):
        return weight * self.mask()


def _suffix_loss(model, tokens, p: int, s: int, precision: str = "fp32") -> torch.Tensor:
    with autocast(precision, tokens.device):
        logits = lm_logits(model, tokens[:, :p + s - 1])
    return suffix_measures(logits, tokens, p, s)[0]


def subnet(model: nn.Module, targets: torch.Tensor, clean: torch.Tensor | None, prefix_len: int, suffix_len: int, *,
           sparsity: float, balanced: bool, opts: dict, seed: int = 0, precision: str = "fp32") -> int:
    """Learn the mask of :func:`mlp_weights` on ``model`` (changed in place: its pruned MLP weights set
    to 0) from the memorised ``targets`` (and, ``balanced``, the ``clean`` sequences), token tensors on
    the model's device, forward passes under ``precision`` (fp16: the loss scaled); returns the number of
    weights pruned."""
    p0 = next(model.parameters())
    generator = torch.Generator().manual_seed(int(seed))
    frozen = {name: q.requires_grad for name, q in model.named_parameters()}
    for q in model.parameters():
        q.requires_grad_(False)
    modules = mlp_weights(model)
    for _, module in modules:
        parametrize.register_parametrization(module, "weight", _EdgePopup(
            module.weight.shape, sparsity, generator, p0.device, p0.dtype))
    scores = [module.parametrizations.weight[0].scores for _, module in modules]
    try:
        optimiser = make_optimizer(scores, "sgd", lr=float(opts["lr"]), momentum=float(opts["momentum"]),
                                   weight_decay=float(opts["weight_decay"]))
        tokens = targets if not balanced or clean is None else torch.cat([targets, clean])
        sign = torch.ones(len(tokens), device=tokens.device)
        sign[:len(targets)] = -1                                 # raise the targets' loss, lower the clean one
        order = torch.Generator().manual_seed(int(seed) + 1)
        scaler = grad_scaler(precision, tokens.device)      # fp16 only; otherwise the plain step
        was_training = model.training
        model.eval()
        for _ in range(int(opts["epochs"])):
            for rows in torch.randperm(len(tokens), generator=order).split(int(opts["batch_size"])):
                rows = rows.to(tokens.device)
                loss = (sign[rows] * _suffix_loss(model, tokens[rows], prefix_len, suffix_len, precision)).mean()
                optimiser.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
        model.train(was_training)
    finally:
        pruned = sum(module.parametrizations.weight[0].pruned for _, module in modules)
        with torch.no_grad():
            for _, module in modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                module.weight.requires_grad_(False)
        for name, q in model.named_parameters():
            q.requires_grad_(frozen.get(name, False))
    return pruned
