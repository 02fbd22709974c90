"""The weight site: the authors' official zeroing rule (pratyushmaini/localizing-memorization).

The released code scores *parameters*, not units: every conv filter (the weight of a conv module
along its first dim, summed over the rest; the official code does this for every 4-D parameter) is one item,
and every other parameter element (linear weights, biases, BatchNorm scale / shift) is an item
of its own. An item's score is ``weight x dO/dweight`` summed over the item, which is exactly
``dO/dm`` for a multiplicative mask ``m`` on the item; zeroed items score 0. The highest score is
zeroed if it is positive; when no item scores above 0 the search stops (not flipped) where the
official code would loop for ever. Items are numbered in ``named_parameters`` order, row-major
inside a parameter, so ties go to the first item as in the official ``argmax`` loop.

:class:`WeightFlipSearch` runs many such searches at once. Conv nets (``batched``): each search has
its own item mask and ``torch.func.functional_call`` under ``vmap`` gives every search its own masked
weights in one forward/backward (a plain loop over searches when a model's layers refuse ``vmap``);
a conv filter's mask scales its output channel, so the convs themselves run with the shared weights;
the forward of the stop test is the step's target term and the reference terms are memoised.
Models without conv filters have an item per weight element, so no search carries a mask:
models made of linear layers only run a group of searches as one model with shared weights and
per-search corrections (:mod:`memloc.analyses.flip.stacked`), others one search at a time with its
items zeroed in place (:mod:`memloc.analyses.flip.dense`); both take the stop test from the step's
own forward, score large linear weights by the rows whose bound reaches the best score, and compute
the first linear layer's reference rows once.
"""
from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from ...core.errors import MemlocError
from ...core.units import hooks_of
from .dense import DenseSteps
from .search import FlipSearch
from .stacked import StackedSteps

__all__ = ["ItemSpace", "WeightItems", "weight_items", "weight_masks", "WeightFlipSearch"]


@dataclass(frozen=True)
class ItemSpace:
    """The items of one parameter: ``size`` items numbered from ``offset``; a mask of
    ``item_shape`` broadcasts over the parameter (``(out, 1, 1, ...)`` for a conv filter)."""

    name: str
    shape: tuple
    item_shape: tuple
    size: int
    offset: int
    filter: bool = False     # a conv module's weight: one item per output filter


@dataclass
class WeightItems:
    """Items of every parameter of a model, in ``named_parameters`` order (the ``spaces`` of a flip
    result at the weight site; ``n_units`` counts items so the flip driver treats both sites alike)."""

    spaces: list[ItemSpace]

    @property
    def n_units(self) -> int:
        return sum(s.size for s in self.spaces)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{parameter name: (..., *item_shape) mask}`` views of a (..., n_items) tensor."""
        lead = flat.shape[:-1]
        return {s.name: flat[..., s.offset:s.offset + s.size].reshape(*lead, *s.item_shape) for s in self.spaces}


def weight_items(model: nn.Module) -> WeightItems:
    """The zeroing items of ``model``'s parameters (see the module docstring)."""
    from ...core.units import CONV_TYPES
    filters = {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, CONV_TYPES)}
    spaces, offset = [], 0
    for name, p in model.named_parameters():
        conv = name in filters and p.dim() >= 3
        item_shape = (p.shape[0],) + (1,) * (p.dim() - 1) if conv else tuple(p.shape)
        size = int(torch.Size(item_shape).numel())
        spaces.append(ItemSpace(name, tuple(p.shape), item_shape, size, offset, conv))
        offset += size
    if not spaces:
        raise MemlocError(f"{type(model).__name__} has no parameters to zero")
    return WeightItems(spaces)


@contextlib.contextmanager
def weight_masks(model: nn.Module, items: WeightItems, mask: torch.Tensor):
    """Multiply ``model``'s parameters by the item ``mask`` (n_items,) in place inside the block;
    the original values are put back on leaving it (also on error)."""
    params = dict(model.named_parameters())
    saved = {}
    try:
        with torch.no_grad():
            for name, m in items.split(mask.reshape(-1)).items():
                if bool((m != 1).any()):
                    saved[name] = params[name].detach().clone()
                    params[name].mul_(m.to(params[name]))
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


class WeightFlipSearch(FlipSearch):
    """:class:`FlipSearch` at the weight site: the same objective, groups, memoised reference terms
    and stopping test; items instead of units, chosen by the official rule (highest positive
    ``weight x gradient``). Parameters as :class:`FlipSearch` (``site``, ``structure`` and
    ``cache_prefix`` do not apply: the first layer's weights are masked too)."""

    def __init__(self, model: nn.Module, ref_x: torch.Tensor, ref_y: torch.Tensor, ref_ids, *,
                 dtype: torch.dtype = torch.float32, cache_mb: float = 256, **_ignored):
        self._setup(model, ref_x, ref_y, ref_ids, dtype)
        self.site = "weight"
        self.structure = weight_items(self.model)
        self._params = {k: v.detach() for k, v in self.model.named_parameters()}
        self._buffers = {k: v for k, v in self.model.named_buffers()}
        self._vmap = True
        #: conv nets: all searches at once under vmap with per-search masks; models without conv
        #: filters (MLPs, transformers): index masks, the stacked group or one search at a time
        self.batched = any(sp.filter for sp in self.structure.spaces)
        self._setup_memo(cache_mb)
        self._offsets = [sp.offset for sp in self.structure.spaces]
        self.prefix = None
        self._slice, self._convs, self._channels = None, {}, {}
        if self.batched:
            self._filter_convs()
        else:
            self._dense = DenseSteps(self)
            self._stacked = StackedSteps(self._dense)

    def _leaves(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter item masks (G, *item_shape), leaves of their own (no slicing in the graph)."""
        g = masks.shape[0]
        return {sp.name: masks[:, sp.offset:sp.offset + sp.size].detach().to(self.dtype).reshape(g, *sp.item_shape)
                .clone().requires_grad_(True) for sp in self.structure.spaces}

    def _call(self, leaves: dict[str, torch.Tensor], inputs: torch.Tensor, *, batched: bool = True,
              shared: bool = False) -> torch.Tensor:
        """Logits (G, n, C) of ``inputs`` (G, n, ...), row g through the weights masked by ``leaves[.][g]``
        (under ``vmap`` unless not ``batched``); ``shared``: ``inputs`` (n, ...) are every search's rows
        (layers before the first masked one then run once).

        A conv filter's mask scales its output channel (:meth:`_channel_hook`): the conv itself runs
        with the shared, unmasked weights, as one convolution over every search's rows."""
        def one(mask, x):
            self._slice = mask
            params = {k: self._channels[k] if k in self._channels else p * mask[k]
                      for k, p in self._params.items()}
            return functional_call(self.model, (params, self._buffers), (x,))

        hooks = {name: self._channel_hook(w, b) for name, (w, b) in self._convs.items()}
        try:
            with hooks_of(self.model, hooks):
                if self._vmap and batched:
                    try:
                        return vmap(one, in_dims=(0, None if shared else 0))(leaves, inputs)
                    except (RuntimeError, NotImplementedError, ValueError):
                        self._vmap = False      # a layer that vmap cannot batch: one search at a time
                g = len(next(iter(leaves.values())))
                return torch.stack([one({k: v[i] for k, v in leaves.items()}, inputs if shared else inputs[i])
                                    for i in range(g)])
        finally:
            self._slice = None

    def _channel_hook(self, weight: str, bias: str | None):
        """Forward hook of a conv: output x filter mask (+ bias x its mask: the conv ran without it)."""
        def hook(mod, inp, out):
            shape = (-1,) + (1,) * (out.dim() - 2)      # channels: dim 1 of (N, C, ...), here without N
            out = out * self._slice[weight].reshape(shape)
            if bias is not None:
                out = out + (self._params[bias] * self._slice[bias]).reshape(shape)
            return out
        return hook

    def _filter_convs(self) -> dict:
        """{conv module name: (weight name, bias name or None)} of the convs whose filter masks can
        scale output channels, and ``self._channels``: the tensors those convs run with (the weight
        unmasked, a zero bias). Checked against masked weights on random masks (none if they differ)."""
        convs, channels = {}, {}
        for name, m in self.model.named_modules():
            weight = f"{name}.weight" if name else "weight"
            if (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and weight in self._params
                    and self._params[weight] is not None):
                bias = weight[:-6] + "bias" if m.bias is not None else None
                convs[name] = (weight, bias)
                channels[weight] = self._params[weight]
                if bias is not None:
                    channels[bias] = torch.zeros_like(self._params[bias])
        self._convs, self._channels = convs, channels
        if convs and not self._channels_agree():
            self._convs, self._channels = {}, {}

    def _channels_agree(self) -> bool:
        """Do the hooked convs give the masked weights' logits and mask gradients (one search, random
        masks, two rows)?"""
        gen = torch.Generator().manual_seed(0)
        masks = (torch.rand(1, self.structure.n_units, generator=gen) > 0.2).to(self.device, self.dtype)
        x = self.ref_x[0, None, :2]
        results, hooked = [], (self._convs, self._channels)
        for convs, channels in (hooked, ({}, {})):
            self._convs, self._channels = convs, channels
            try:
                leaves = self._leaves(masks)
                with torch.enable_grad():
                    logits = self._call(leaves, x, batched=False)
                    grads = torch.autograd.grad(logits.logsumexp(-1).sum(), list(leaves.values()))
                results.append((logits.detach(), self._flat(grads, 1)))
            except (RuntimeError, ValueError):
                return False
            finally:
                self._convs, self._channels = hooked
        (l1, g1), (l0, g0) = results
        tol = 1e-9 if self.dtype == torch.float64 else 1e-4
        return bool(torch.allclose(l0, l1, rtol=tol, atol=tol * float(l0.abs().max()))
                    and torch.allclose(g0, g1, rtol=tol, atol=tol * float(g0.abs().max())))

    def _flat(self, grads, g: int) -> torch.Tensor:
        return torch.cat([t.reshape(g, -1) for t in grads], 1)

    def _terms(self, masks, xt, yt, ref_masks, ref_repeats, excluded, *, use_prefix=True):
        target, ref = self._leaves(masks), self._leaves(ref_masks)
        with torch.enable_grad():
            target_logits = self._call(target, xt).mean(1)
            ref_logits = self._call(ref, self.ref_x[ref_repeats]) if len(ref_masks) else None
            objective = self._objective(target_logits, yt, ref_logits, ref_repeats, excluded)
            leaves = list(target.values()) + (list(ref.values()) if len(ref_masks) else [])
            grads = torch.autograd.grad(objective, leaves)
        n = len(target)
        grad_t = self._flat(grads[:n], len(masks))
        grad_r = self._flat(grads[n:], len(ref_masks)) if len(ref_masks) else torch.zeros_like(ref_masks, dtype=self.dtype)
        return target_logits.argmax(1), grad_t, grad_r

    # -- one search at a time (models without conv filters): index masks, the step's own forward as the check
    def _start(self, s: dict) -> dict:
        if self.batched:       # per parameter: the item mask (1 = kept)
            s["mask"] = {sp.name: torch.ones(sp.item_shape, dtype=self.dtype, device=self.device)
                         for sp in self.structure.spaces}
            return s
        s["zeroed"] = [[] for _ in self.structure.spaces]      # per parameter: local indices of the zeroed items
        return s

    def _check(self, check: list[dict], max_units: int) -> np.ndarray:
        """Per search, as the official loop: one forward of its copies and its reference batch under its
        zeroed items gives the prediction; a search that goes on gets its gradient and next item from
        the same forward (kept in ``s["next"]`` for :meth:`_advance`)."""
        if self.batched:
            return self._check_batched(check)
        flipped = np.zeros(len(check), dtype=bool)
        live = [i for i, s in enumerate(check) if not s.get("stuck")]
        if self._stacked.usable and live:
            flipped[live] = self._stacked.check([check[i] for i in live], [len(check[i]["units"]) < max_units
                                                                          for i in live])
            return flipped
        for i in live:
            flipped[i] = self._dense.step(check[i], len(check[i]["units"]) < max_units)
        return flipped

    # -- all searches at once (conv nets): per-parameter masks; the checks' forward of the targets is
    # -- the step's target term
    def _check_batched(self, check: list[dict]) -> np.ndarray:
        leaves = {sp.name: torch.stack([s["mask"][sp.name] for s in check]).requires_grad_(True)
                  for sp in self.structure.spaces}
        with torch.enable_grad():
            logits = self._call(leaves, torch.stack([s["xt"] for s in check])).mean(1)
        for i, s in enumerate(check):
            s["target"] = (logits, leaves, i)
        return (logits.argmax(1) != torch.stack([s["y"] for s in check])).cpu().numpy()

    def _advance_batched(self, slots: list[dict]) -> None:
        """One step of every search of ``slots``: the reference terms not memoised yet, one backward,
        and per search the official rule's item (:meth:`_best`)."""
        targets = [s.pop("target") for s in slots]
        keys, misses, first, repeats, excluded = self._misses(slots)
        batches = list({id(leaves): leaves for _, leaves, _ in targets}.values())
        names = [sp.name for sp in self.structure.spaces]
        rows = [(id(leaves), i) for _, leaves, i in targets]
        whole = len(batches) == 1 and [i for _, i in rows] == list(range(len(targets[0][0])))
        ref = {k: torch.stack([targets[i][1][k][targets[i][2]] for i in first]).detach().requires_grad_(True)
               for k in names} if misses else {}
        with torch.enable_grad():
            shared = len(set(repeats.tolist())) == 1        # one reference batch: its first layer runs once
            ref_logits = (self._call(ref, self.ref_x[int(repeats[0])] if shared else self.ref_x[repeats], shared=shared)
                          if misses else None)
            target = targets[0][0] if whole else torch.stack([logits[i] for logits, _, i in targets])
            objective = self._objective(target, torch.stack([s["y"] for s in slots]), ref_logits, repeats, excluded)
            grads = iter(torch.autograd.grad(objective, [v for leaves in batches + [ref] for v in leaves.values()]))
        grad_t = {id(leaves): {k: next(grads) for k in names} for leaves in batches}
        grad_r = {k: next(grads) for k in names} if misses else {}
        terms = self._remember(keys, misses, [{k: grad_r[k][m] for k in names} for m in range(len(misses))])
        zeroed = {}                    # per parameter: (search, item) of the zeroed items, scored 0
        for i, s in enumerate(slots):
            for j in s["units"]:
                p = bisect.bisect_right(self._offsets, j) - 1
                zeroed.setdefault(p, []).append((i, j - self._offsets[p]))
        scores = []
        for p, k in enumerate(names):      # target term + reference term
            g = grad_t[rows[0][0]][k] if whole else torch.stack([grad_t[b][k][i] for b, i in rows])
            score = g.add_(torch.stack([t[k] for t in terms])).flatten(1)
            if p in zeroed:
                score[tuple(torch.tensor(zeroed[p], device=self.device).t())] = 0
            scores.append(score)
        self._best(slots, scores)

    def _best(self, slots: list[dict], scores: list[torch.Tensor]) -> None:
        """Zero each search's item of highest score (the first parameter holding its maximum, the first
        item in it) if that score is above 0; else the search is stuck. ``scores``: per parameter (G, size)."""
        tops = torch.stack([sc.amax(1) for sc in scores], 1)           # (G, parameters)
        top = tops.amax(1)
        space = (tops == top[:, None]).to(torch.uint8).argmax(1).tolist()
        for i, (s, p, t) in enumerate(zip(slots, space, top.tolist())):
            if not t > 0:
                s["stuck"] = True
                continue
            sp, j = self.structure.spaces[p], int(scores[p][i].argmax())
            s["units"].append(sp.offset + j)
            s["mask"][sp.name].view(-1)[j] = 0

    def _advance(self, slots: list[dict]) -> None:
        if self.batched:
            return self._advance_batched(slots)
        for s in slots:
            space, j = s.pop("next")
            if space is None:
                s["stuck"] = True
            else:
                s["units"].append(self.structure.spaces[space].offset + j)
                s["zeroed"][space].append(j)

    def zeroing(self, model: nn.Module, mask: torch.Tensor):
        return weight_masks(model, self.structure, mask)
