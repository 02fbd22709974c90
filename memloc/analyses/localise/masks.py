"""Learned neuron masks, after MemPi: Slimming and Hard Concrete.

Both learn one mask value per neuron (L, d) that keeps the target's suffix loss low while a penalty
pushes the masks towards zero; the neurons whose mask survives are the ones the target needs. Adam
on the mask parameters alone (the model is frozen), loss = suffix loss + lambda x penalty; every
``check_every`` steps a target whose penalty has fallen below ``stop_loss`` stops (MemPi's rule);
at most ``max_steps`` steps. Targets are optimised together, ``eval_batch_size`` at a time, each with
its own masks and its own stop (Adam is elementwise, so a target's masks do not depend on the others').

- ``slimming`` (Network Slimming as MemPi uses it): masks m initialised to 1, the neurons multiplied
  by clip(m, 0, 1), penalty = mean |m| over all neurons; score = clip(m, 0, 1).
- ``hard_concrete`` (L0 masks, Louizos et al. 2018, MemPi's modeling_hardconcrete): log-alphas a
  initialised to log(q / (1 - q)), q = (mask_p - l) / (r - l); in training the mask is
  clip(sigmoid((log u - log(1 - u) + a) / beta) (r - l) + l, 0, 1) with u ~ U(0, 1) drawn afresh
  each step from the target's own stream (``seed`` and its id), (l, r) = ``limits``; penalty = the
  expected share of non-zero masks, mean of sigmoid(a - beta log(-l / r)); score = sigmoid(a).
"""
from __future__ import annotations

import math

import torch

from ...core.optim import make_optimizer
from ...core.precision import grad_scaler
from .common import Targets, suffix_loss

__all__ = ["slimming", "hard_concrete"]


def _learn(t: Targets, opts: dict, lam: float, init: float, mask_of, penalty_of, score_of) -> torch.Tensor:
    out = torch.zeros(t.shape, dtype=torch.float64)
    rows_all = torch.arange(len(t.tokens))
    check = int(opts["check_every"])
    for rows in rows_all.split(t.eval_batch_size):
        x = t.tokens[rows]
        params = torch.full(t.ones(len(rows)).shape, init, dtype=t.ones(1).dtype, device=x.device, requires_grad=True)
        optimiser = make_optimizer([params], "adam", lr=float(opts["lr"]), weight_decay=0.0)   # = Adam
        scaler = grad_scaler(t.precision, x.device)         # fp16 only; otherwise the plain gradient and step
        done = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
        final = params.detach().clone()
        for step in range(int(opts["max_steps"])):
            active = torch.nonzero(~done).flatten()
            p = params[active]
            loss, _ = suffix_loss(t, x[active], mask_of(p, rows[active.cpu()]))
            penalty = penalty_of(p)
            go = torch.ones(len(active), dtype=torch.bool, device=x.device)
            if (step + 1) % check == 0:                    # MemPi: stop before this step's update
                go = penalty.detach() >= float(opts["stop_loss"])
                final[active[~go]] = p[~go].detach()
                done[active[~go]] = True
                if done.all():
                    break
            total = (loss + lam * penalty)[go].sum()
            params.grad, = torch.autograd.grad(scaler.scale(total), params)
            scaler.step(optimiser)
            scaler.update()
        final[~done] = params.detach()[~done]
        out[rows] = score_of(final).double().cpu()
    return out


def slimming(t: Targets, opts: dict) -> torch.Tensor:
    """(B, L, d) float64: clip(m, 0, 1) of the learned masks (module docstring)."""
    return _learn(t, opts, float(opts["lambda_l1"]), 1.0, mask_of=lambda m, rows: m.clamp(0, 1),
                  penalty_of=lambda m: m.abs().mean((1, 2)), score_of=lambda m: m.clamp(0, 1))


def hard_concrete(t: Targets, opts: dict) -> torch.Tensor:
    """(B, L, d) float64: sigmoid of the learned log-alphas (module docstring)."""
    low, high = (float(v) for v in opts["limits"])
    beta = float(opts["beta"])
    q = (float(opts["mask_p"]) - low) / (high - low)
    generators = {}         # each target's own noise stream (Targets.row_seed): the same in any batch

    def noise(row: int, like):
        if row not in generators:
            generators[row] = torch.Generator(device=like.device).manual_seed(t.row_seed(row))
        return torch.rand(like.shape[1:], generator=generators[row], device=like.device, dtype=like.dtype)

    def mask_of(a, rows):
        u = torch.stack([noise(r, a) for r in rows.tolist()]).clamp(1e-4, 1 - 1e-4)
        s = torch.sigmoid((u.log() - (1 - u).log() + a) / beta)
        return (s * (high - low) + low).clamp(0, 1)
    return _learn(t, opts, float(opts["lambda_l0"]), math.log(q / (1 - q)), mask_of=mask_of,
                  penalty_of=lambda a: torch.sigmoid(a - beta * math.log(-low / high)).mean((1, 2)),
                  score_of=torch.sigmoid)
