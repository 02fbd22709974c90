"""The weight site: the authors' official zeroing rule (pratyushmaini/localizing-memorization).

The released code scores *parameters*, not units: every conv filter (the weight of a conv module
along its first dim, summed over the rest; the official code does this for every 4-D parameter) is one item,
and every other parameter element (linear weights, biases, BatchNorm scale / shift) is an item
of its own. An item's score is ``weight x dO/dweight`` summed over the item, which is exactly
``dO/dm`` for a multiplicative mask ``m`` on the item; zeroed items score 0. The highest score is
zeroed if it is positive; when no item scores above 0 the search stops (not flipped) where the
official code would loop for ever. Items are numbered in ``named_parameters`` order, row-major
inside a parameter, so ties go to the first item as in the official ``argmax`` loop.

:class:`WeightFlipSearch` runs many such searches at once. Conv nets (``batched``,
:mod:`memloc.analyses.flip.batched`): each search has its own item masks and
``torch.func.functional_call`` under ``vmap`` runs every search in one forward/backward (a plain
loop over searches when a model's layers refuse ``vmap``); convs and linear layers run with the
shared weights (a filter's mask scales its output channel, zeroed linear weights are subtracted
from the outputs); the forward of the stop test is the step's target term and the reference terms
are memoised.
Models without conv filters have an item per weight element, so no search carries a mask:
models made of linear layers only run a group of searches as one model with shared weights and
per-search corrections (:mod:`memloc.analyses.flip.stacked`), others one search at a time with its
items zeroed in place (:mod:`memloc.analyses.flip.dense`); both take the stop test from the step's
own forward, score large linear weights by the rows whose bound reaches the best score, and compute
the first linear layer's reference rows once.

A language model's weight site (:func:`lm_weight_params`) has items in the weights and biases of the
layers whose outputs are flip's units, the blocks' projections (no conv filters): its searches run one
at a time (:mod:`memloc.analyses.flip.dense`, the first layer's rows not cached: a transformer's
residual stream has no single cut), stopping when the suffix is no longer reproduced.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...core.errors import MemlocError
from ...core.tasks import SequenceTask
from .batched import BatchedSteps
from .dense import DenseSteps
from .search import FlipSearch
from .stacked import StackedSteps

__all__ = ["ItemSpace", "WeightItems", "weight_items", "lm_weight_params", "weight_masks", "WeightFlipSearch"]


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


def weight_items(model: nn.Module, params=None) -> WeightItems:
    """The zeroing items of ``model``'s parameters (see the module docstring); ``params``: the names of
    the parameters that have items (default all; a language model's: :func:`lm_weight_params`)."""
    from ...core.units import CONV_TYPES
    filters = {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, CONV_TYPES)}
    named = dict(model.named_parameters())
    if params is not None:
        unknown = [k for k in params if k not in named]
        if unknown:
            raise MemlocError(f"{type(model).__name__} has no parameter {unknown[0]!r}")
        keep = set(params)
        named = {k: v for k, v in named.items() if k in keep}
    spaces, offset = [], 0
    for name, p in named.items():
        conv = name in filters and p.dim() >= 3
        item_shape = (p.shape[0],) + (1,) * (p.dim() - 1) if conv else tuple(p.shape)
        size = int(torch.Size(item_shape).numel())
        spaces.append(ItemSpace(name, tuple(p.shape), item_shape, size, offset, conv))
        offset += size
    if not spaces:
        raise MemlocError(f"{type(model).__name__} has no parameters to zero")
    return WeightItems(spaces)


def lm_weight_params(model: nn.Module, tokens: torch.Tensor) -> list[str]:
    """The parameters a language model's weight site zeroes: those of the layers whose outputs are
    flip's units (:func:`memloc.core.units.trace`: the linear / ``Conv1D`` projections of the blocks, the
    logits layer, embeddings and norms that follow nothing left out), weights and biases, in
    ``named_parameters`` order. ``tokens``: (B, T) token ids to trace with."""
    from ...core.units import trace
    structure = trace(model, tokens)
    names = {sp.name for sp in structure.spaces}
    keep = {k for layer in structure.layers if layer.name in names for k in layer.params}
    return [k for k, _ in model.named_parameters() if k in keep]


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
    ``cache_prefix`` do not apply: the first layer's weights are masked too); ``params``: the names of
    the parameters with items (default all; a language model's: :func:`lm_weight_params`). A language
    model (``task`` a :class:`memloc.core.tasks.SequenceTask`) runs one search at a time
    (:mod:`memloc.analyses.flip.dense`), its stop test the task's (the suffix no longer reproduced)."""

    def __init__(self, model: nn.Module, ref_x: torch.Tensor, ref_y: torch.Tensor, ref_ids, *,
                 dtype: torch.dtype = torch.float32, cache_mb: float = 256, task=None, params=None, **_ignored):
        self._setup(model, ref_x, ref_y, ref_ids, dtype, task)
        self.site = "weight"
        self.structure = weight_items(self.model, params)
        #: conv nets: all searches at once under vmap with per-search masks; models without conv
        #: filters (MLPs, transformers): index masks, the stacked group or one search at a time
        self.batched = any(sp.filter for sp in self.structure.spaces)
        if self.batched and isinstance(self.task, SequenceTask):
            raise MemlocError(f"{type(model).__name__} has conv filters among the parameters to zero; the weight site "
                              "zeroes a language model's linear projections only: use {site}",
                              options={"site": "pre_norm"}, argument="site")
        self._setup_memo(cache_mb)
        self.prefix = None
        if self.batched:
            self._batched = BatchedSteps(self)
        else:
            self._dense = DenseSteps(self)
            self._stacked = StackedSteps(self._dense)

    def path(self) -> dict:
        """How the searches ran, for the result's config: ``weight_site_path`` ``"vmap"`` (conv nets, all
        searches of a group in one pass), ``"loop"`` (conv nets whose layers ``vmap`` refused: one search
        at a time, the same items; ``weight_site_fallback`` says why), ``"stacked"`` or ``"dense"``
        (models without conv filters)."""
        if self.batched:
            loop = not self._batched.vmap
            return {"weight_site_path": "loop" if loop else "vmap",
                    "weight_site_fallback": self._batched.fallback if loop else None}
        return {"weight_site_path": "stacked" if self._stacked.usable else "dense", "weight_site_fallback": None}

    def objective_grad(self, *args, **kwargs):
        raise NotImplementedError("the weight site has no unit masks; its steps are in BatchedSteps / "
                                  "StackedSteps / DenseSteps")

    # -- one search at a time (models without conv filters): index masks, the step's own forward as the check
    def _start(self, s: dict) -> dict:
        if self.batched:
            self._batched.start(s)
            return s
        s["zeroed"] = [[] for _ in self.structure.spaces]      # per parameter: local indices of the zeroed items
        return s

    def _check(self, check: list[dict], max_units: int) -> np.ndarray:
        """Per search, as the official loop: one forward of its copies and its reference batch under its
        zeroed items gives the prediction; a search that goes on gets its gradient and next item from
        the same forward (kept in ``s["next"]`` for :meth:`_advance`)."""
        if self.batched:
            return self._batched.check(check)
        flipped = np.zeros(len(check), dtype=bool)
        live = [i for i, s in enumerate(check) if not s.get("stuck")]
        if self._stacked.usable and live:
            flipped[live] = self._stacked.check([check[i] for i in live], [len(check[i]["units"]) < max_units
                                                                          for i in live])
            return flipped
        for i in live:
            flipped[i] = self._dense.step(check[i], len(check[i]["units"]) < max_units)
        return flipped

    def _advance(self, slots: list[dict]) -> None:
        if self.batched:
            return self._batched.advance(slots)
        for s in slots:
            space, j = s.pop("next")
            if space is None:
                s["stuck"] = True
            else:
                s["units"].append(self.structure.spaces[space].offset + j)
                s["zeroed"][space].append(j)

    def zeroing(self, model: nn.Module, mask: torch.Tensor):
        return weight_masks(model, self.structure, mask)
