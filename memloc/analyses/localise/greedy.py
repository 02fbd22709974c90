"""Gradient x activation, and memloc's greedy gradient-guided zeroing (the language-model form of
:mod:`memloc.analyses.flip`).

Under neuron masks m (1 = kept, 0 = zeroed), zeroing kept neuron j changes an objective O by about
``-m_j dO/dm_j`` = -(activation x gradient, summed over positions): the first-order estimate of the
increase. O is the target's suffix loss, minus ``reference_weight`` x the mean suffix loss of the
reference sequences under the same masks when there are any (:mod:`memloc.analyses.flip`'s protocol:
raise the target's loss while keeping the others' low, so that neurons every sequence needs are not
picked; each target evaluates the reference under its own masks).

- ``grad_x_act``: the estimate for the target's loss alone with nothing zeroed, one forward and
  backward pass per batch.
- ``greedy``: repeat (1) stop if greedy decoding no longer reproduces the suffix (and at least
  ``min_zeroed`` neurons are zeroed), or ``max_zeroed`` neurons are zeroed; (2) zero the kept neuron
  with the largest estimate (ties: the lowest index, layer by layer). The neurons zeroed, in order, rank
  first (the first zeroed highest); the others follow by the estimate at the mask where the search
  stopped. ``zeroed`` counts the neurons zeroed when the suffix first broke. ``min_zeroed`` carries
  the search on past the break, so that it orders at least that many neurons itself: by default
  (``"auto"``, :func:`.common.greedy_budget`) the L k a top-k-per-layer reading of L layers takes (INJ's
  k injected, DEL's largest count); 0 stops at the break. The estimates are redone after every
  zeroing, which matters when the remaining neurons were saturated (a confident prediction has a small
  gradient) before: on INJ, carrying on raised the recall of the injected neurons
  (artifacts/lm_localisation.md). Targets are searched together, ``eval_batch_size``
  at a time, each under its own masks; a target's search does not depend on the others' (in float64 the
  batched and one-at-a-time searches zero the same neurons).
"""
from __future__ import annotations

import torch

from .common import Targets, suffix_loss

__all__ = ["grad_x_act", "greedy"]


def _estimate(t: Targets, x: torch.Tensor, masks: torch.Tensor, reference_weight: float = 0.0):
    """(estimate (b, L*d), memorised (b,)) under flat ``masks`` (b, L*d)."""
    masks = masks.detach().requires_grad_(True)
    shaped = masks.view(len(x), len(t.layers), t.d)
    loss, memorised = suffix_loss(t, x, shaped)
    objective = loss.sum()
    if t.reference is not None and reference_weight:
        r = len(t.reference)
        ref, _ = suffix_loss(t, t.reference.repeat(len(x), 1), shaped.repeat_interleave(r, 0))
        objective = objective - reference_weight * ref.view(len(x), r).mean(1).sum()
    grad, = torch.autograd.grad(objective, masks)
    return -(grad * masks).detach(), memorised


def grad_x_act(t: Targets, opts: dict) -> torch.Tensor:
    """(B, L, d) float64: the first-order loss increase of zeroing each neuron alone."""
    out = [_estimate(t, x, t.ones(len(x)).view(len(x), -1))[0] for x in t.tokens.split(t.eval_batch_size)]
    return torch.cat(out).double().cpu().view(t.shape)


def greedy(t: Targets, opts: dict):
    """((B, L, d) float64 scores, (B,) int64 number zeroed when the suffix broke (all zeroed if it did
    not), (B,) bool suffix broken) (module docstring)."""
    max_zeroed = int(opts["max_zeroed"])
    min_zeroed = min(int(opts["min_zeroed"]), max_zeroed)
    n_units = len(t.layers) * t.d
    scores = torch.zeros(len(t.tokens), n_units, dtype=torch.float64)
    zeroed = torch.zeros(len(t.tokens), dtype=torch.int64)
    broken = torch.zeros(len(t.tokens), dtype=torch.bool)
    for rows in torch.arange(len(t.tokens)).split(t.eval_batch_size):
        x = t.tokens[rows]
        masks = t.ones(len(rows)).view(len(rows), -1)
        order = [[] for _ in rows]
        first_break = [-1] * len(rows)
        active = torch.arange(len(rows))
        for step in range(max_zeroed + 1):
            estimate, memorised = _estimate(t, x[active], masks[active], float(opts["reference_weight"]))
            estimate = estimate.masked_fill(masks[active] == 0, -torch.inf)
            stop = []
            for i, r in enumerate(active.tolist()):
                if first_break[r] < 0 and not bool(memorised[i]):
                    first_break[r] = len(order[r])
                stop.append((first_break[r] >= 0 and len(order[r]) >= min_zeroed) or step == max_zeroed)
            stop = torch.as_tensor(stop, dtype=torch.bool)
            for i in torch.nonzero(stop).flatten().tolist():
                r = int(active[i])
                row = estimate[i].double().cpu()
                top = row[torch.isfinite(row)].max() if torch.isfinite(row).any() else torch.tensor(0.0)
                row[order[r]] = top + torch.arange(len(order[r]), 0, -1, dtype=torch.float64)
                scores[rows[r]] = row
                zeroed[rows[r]] = first_break[r] if first_break[r] >= 0 else len(order[r])
                broken[rows[r]] = first_break[r] >= 0
            keep = ~stop
            if not keep.any():
                break
            pick = estimate[keep.to(estimate.device)].argmax(1).cpu()
            active = active[keep]
            masks[active.to(masks.device), pick.to(masks.device)] = 0
            for r, j in zip(active.tolist(), pick.tolist()):
                order[r].append(j)
    return scores.view(t.shape), zeroed, broken
