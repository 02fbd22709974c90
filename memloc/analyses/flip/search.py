"""The batched greedy flip search (the kernel): many examples' searches in one forward/backward."""
from __future__ import annotations

import copy
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ...core.errors import MemlocError
from ...core.tasks import ClassifierTask, SequenceTask
from ...core.units import SITES, Hooks, Structure, hooks_of, trace, unit_masks
from .embed_noise import replaced_embeddings, token_embedding

__all__ = ["noise_seed", "noisy_copies", "FlipTrace", "FlipSearch"]


def noise_seed(seed: int, example: int, repeat: int, step: int) -> int:
    """The seed of the noise drawn for ``example`` in ``repeat`` at ``step`` (group independent)."""
    state = np.random.SeedSequence([seed, 2, int(example), int(repeat), int(step)]).generate_state(1, np.uint64)
    return int(state[0] & np.uint64(2 ** 63 - 1))


def noisy_copies(x: torch.Tensor, samples: int, ratio: float, seed: int) -> torch.Tensor:
    """``samples`` copies of one input ``x`` (...) plus Gaussian noise of norm ``ratio * ||x||``.

    ``samples == 0`` returns ``x[None]``. Draws on the CPU in float64 from ``seed`` (the same
    values on every device). Returns (max(samples, 1), ...).
    """
    if samples == 0:
        return x[None]
    z = torch.randn((samples,) + tuple(x.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z * (ratio * float(x.double().norm()) / z.flatten(1).norm(dim=1).clamp_min(1e-30)).view(-1, *[1] * x.ndim)
    return x[None] + z.to(device=x.device, dtype=x.dtype)


@dataclass
class FlipTrace:
    """One finished search: target ``k`` (row of the targets), ``repeat``, zeroed unit ids in order."""

    k: int
    repeat: int
    units: np.ndarray   # (n_units,) int64 global unit ids, in the order they were zeroed
    flipped: bool


class FlipSearch:
    """Batched greedy flip searches on a private copy of ``model`` (never edits ``model``).

    Per step, the target term (the example's noisy copies under its mask) is computed for every
    running search; the reference term's gradient depends only on (repeat, set of zeroed units,
    excluded target) and is memoised: searches that reach the same mask (common: the greedy
    choices of different examples often agree for the first units) share one evaluation of the
    reference batch. Both terms come from one forward/backward per step.

    What a model's outputs, an example's loss and "flipped" are comes from ``task``
    (:mod:`memloc.core.tasks`): for a classifier (the default) the logits, the cross-entropy of the
    label and "the label is no longer the argmax"; for a language model's sequences
    (:class:`memloc.core.tasks.SequenceTask`) the teacher-forced logits, the suffix loss and "the
    suffix is no longer reproduced exactly", the labels being the token rows themselves.

    Parameters
    ----------
    model : classifier (or causal LM with ``task``); copied, cast to ``dtype``, put in eval mode, parameters frozen.
    ref_x : (R, B, ...) reference inputs, one batch per repeat (token ids stay integers).
    ref_y : (R, B, ...) their labels (:meth:`memloc.core.tasks.ClassifierTask.target`).
    ref_ids : (R, B) their example ids (a target is left out of its own reference mean).
    site : ``pre_norm`` | ``post_norm`` (see :func:`memloc.core.units.unit_masks`).
    dtype : computation dtype; ``torch.float64`` makes results independent of the grouping.
    structure : unit structure of ``model`` (default: traced).
    cache_prefix : compute the network up to the first unit layer once per reference batch
        (checked against the plain computation at construction; off if they differ).
    cache_mb : memory for memoised reference gradients (least recently used are dropped).
    task : the task piece (default :class:`memloc.core.tasks.ClassifierTask`).
    """

    def __init__(self, model: nn.Module, ref_x: torch.Tensor, ref_y: torch.Tensor, ref_ids, *,
                 site: str = "pre_norm", dtype: torch.dtype = torch.float32,
                 structure: Structure | None = None, cache_prefix: bool = True, cache_mb: float = 256, task=None):
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; valid: {', '.join(SITES)}")
        self._setup(model, ref_x, ref_y, ref_ids, dtype, task)
        self.site = site
        self.structure = structure or trace(self.model, self.ref_x[0, :1])
        if self.structure.n_units == 0:
            raise MemlocError(f"{type(model).__name__} has no units (no conv/linear layer before the logits)")
        self._setup_memo(cache_mb)
        self.first = self.structure.spaces[0].module
        self.prefix = None
        if cache_prefix and self.task.prefix_cache:
            self.prefix = self._prefix_outputs()
            if self.prefix is not None and not self._prefix_agrees():
                self.prefix = None

    def _setup(self, model, ref_x, ref_y, ref_ids, dtype, task=None):
        """A private frozen eval-mode copy of ``model`` in ``dtype`` and the reference batches."""
        device = ref_x.device
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.dtype, self.device = dtype, device
        self.task = ClassifierTask if task is None else task
        self.ref_x = self._cast(ref_x)
        self.ref_y = ref_y.to(device).long()
        self.ref_ids = torch.as_tensor(np.asarray(ref_ids), device=device).long()
        self._ref_sets = [set(row.tolist()) for row in self.ref_ids.cpu()]
        self._embedding = None        # the token-embedding module (a language model's noise)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the search's dtype (integer inputs, token ids, as they are)."""
        return x.to(self.dtype) if x.is_floating_point() else x

    def _outputs(self, inputs: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """The task's outputs of ``inputs``; ``emb`` (n, T, d): noised token embeddings of the first n rows
        (a language model's noise, :mod:`memloc.analyses.flip.embed_noise`)."""
        if emb is None:
            return self.task.outputs(self.model, self._cast(inputs))
        with replaced_embeddings(self._embedding, emb):
            return self.task.outputs(self.model, inputs)

    def _copies(self, s: dict, x: torch.Tensor, samples: int, ratio: float, seed: int) -> torch.Tensor:
        """The target copies of search ``s`` (row ``x``): ``samples`` noised copies of an image; a token row
        repeated, its noised token embeddings put in ``s["emb"]``."""
        if not isinstance(self.task, SequenceTask) or not samples:
            return noisy_copies(self._cast(x), samples, ratio, seed) if samples else self._cast(x)[None]
        if self._embedding is None:
            self._embedding = token_embedding(self.model, x[None], self.task.outputs)
        if "clean" not in s:       # the row's token embeddings (upstream of every unit / zeroed parameter)
            grab = []
            with torch.no_grad(), Hooks() as h:
                h.forward(self._embedding, lambda mod, inp, out: grab.append(out[0].detach()))
                self.task.outputs(self.model, x[None])
            s["clean"] = grab[0]
        s["emb"] = noisy_copies(s["clean"], samples, ratio, seed)
        return x[None].expand(samples, *x.shape)

    @staticmethod
    def _noised(slots: list[dict]):
        """The noised token embeddings of ``slots``' copies, stacked (None: no such noise)."""
        return torch.cat([s["emb"] for s in slots]) if slots and "emb" in slots[0] else None

    def _setup_memo(self, cache_mb):
        itemsize = torch.finfo(self.dtype).bits // 8
        self._memo: OrderedDict = OrderedDict()
        self._memo_max = max(64, int(cache_mb * 2 ** 20 / (self.structure.n_units * itemsize)))
        self.stats = {"example_steps": 0, "reference_evaluations": 0}

    # -- one forward/backward
    def _terms(self, masks, xt, yt, ref_masks, ref_repeats, excluded, *, use_prefix=True, emb=None):
        """Forward/backward of the target term for G searches and the reference term for M masks.

        ``masks`` (G, n_units), ``xt`` (G, copies, ...), ``yt`` (G,); ``ref_masks`` (M, n_units),
        ``ref_repeats`` (M,) reference batch of each, ``excluded`` (M,) example id left out of
        that reference mean (-1: none); ``emb``: the targets' noised token embeddings (:meth:`_outputs`). Returns ``right`` (G,) (the copies' mean outputs right, bool),
        ``d(-loss_target)/dmask`` (G, n_units) and ``d(mean reference loss)/dmask`` (M, n_units).
        """
        g, nt = xt.shape[:2]
        m, b = len(ref_masks), self.ref_y.shape[1]
        masks = masks.detach().to(self.dtype).requires_grad_(True)
        ref_masks = ref_masks.detach().to(self.dtype).requires_grad_(True)
        rows = torch.cat([masks.repeat_interleave(nt, 0), ref_masks.repeat_interleave(b, 0)])
        hooks = {}
        if use_prefix and self.prefix is not None:
            inputs = xt.flatten(0, 1)
            if m:
                inject = self.prefix[ref_repeats].flatten(0, 1)
                hooks[self.first] = lambda mod, inp, out: torch.cat([out, inject])
        else:
            inputs = torch.cat([xt.flatten(0, 1), self.ref_x[ref_repeats].flatten(0, 1)])
        with torch.enable_grad():
            with hooks_of(self.model, hooks), unit_masks(self.model, self.structure, rows, site=self.site):
                logits = self._outputs(inputs, emb)
            target_logits = logits[:g * nt].view(g, nt, *logits.shape[1:]).mean(1)
            objective = self._objective(target_logits, yt, logits[g * nt:].view(m, b, *logits.shape[1:]), ref_repeats,
                                        excluded)
            grad_t, grad_r = torch.autograd.grad(objective, [masks, ref_masks])
        return self.task.right(target_logits, yt), grad_t, grad_r

    def _objective(self, target_logits, yt, ref_logits, ref_repeats, excluded):
        """Sum over searches of O = (mean reference loss without the target) - target loss.

        ``target_logits`` (G, ...) (the copies' mean), ``ref_logits`` (M, B, ...) or None (M = 0)."""
        objective = -self.task.loss_of(target_logits, yt).sum()
        if ref_logits is not None and len(ref_logits):
            m, b = ref_logits.shape[:2]
            ref_loss = self.task.loss_of(ref_logits.flatten(0, 1), self.ref_y[ref_repeats].flatten(0, 1)).view(m, b)
            keep = (self.ref_ids[ref_repeats] != excluded[:, None]).to(self.dtype)
            objective = objective + ((ref_loss * keep).sum(1) / keep.sum(1).clamp_min(1)).sum()
        return objective

    def objective_grad(self, masks: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                       repeats: torch.Tensor, target_ids: torch.Tensor, *, use_prefix: bool = True):
        """Whether each target is right and ``dO/dmask`` for G searches, without memoisation.

        ``masks`` (G, n_units), ``xt`` (G, copies, ...) target inputs, ``yt`` (G, ...) labels,
        ``repeats`` (G,) which reference batch, ``target_ids`` (G,). Returns ``right`` (G,) and
        ``grad`` (G, n_units).
        """
        right, grad_t, grad_r = self._terms(masks, xt, yt, masks, repeats, target_ids, use_prefix=use_prefix)
        return right, grad_t + grad_r

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted classes (N,) of inputs ``x`` with no unit zeroed, in the search's dtype."""
        with torch.no_grad():
            return torch.cat([self._outputs(x[s:s + batch_size]).argmax(-1) for s in range(0, len(x), batch_size)])

    def correct(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N,) bool: is each example of inputs ``x`` with labels ``y`` right with no unit zeroed (a
        classifier: its label predicted; a language model: its suffix reproduced exactly)?"""
        with torch.no_grad():
            return torch.cat([self.task.right(self._outputs(x[s:s + batch_size]), y[s:s + batch_size])
                              for s in range(0, len(x), batch_size)])

    def run(self, x: torch.Tensor, y: torch.Tensor, target_ids, tasks: Iterable[tuple[int, int]], *,
            max_units: int = 100, noise_samples: int = 0, noise_ratio: float = 0.01, seed: int = 0,
            group_size: int = 32) -> Iterator[FlipTrace]:
        """Run the searches ``tasks`` = (row k of ``x``, repeat r) pairs; yield each as it finishes.

        ``x`` (K, ...) targets, ``y`` (K,) their labels, ``target_ids`` (K,) their example ids
        (noise seeds, reference exclusion). At most ``group_size`` searches run at once.
        """
        ids = np.asarray(target_ids, dtype=np.int64)
        y = y.to(self.device).long()
        queue = deque((int(k), int(r)) for k, r in tasks)
        max_units = min(max_units, self.structure.n_units)
        slots: list[dict] = []
        while queue or slots:
            # check the current masks (a cheap forward of the targets only); finished searches leave,
            # queued ones take their place until the group is full of searches that go on
            check, slots = slots, []
            while True:
                while queue and len(slots) + len(check) < group_size:
                    k, r = queue.popleft()
                    excluded = int(ids[k]) if int(ids[k]) in self._ref_sets[r] else -1
                    check.append(self._start({"k": k, "r": r, "units": [], "excluded": excluded, "y": y[k]}))
                if not check:
                    break
                for s in check:
                    s["xt"] = self._copies(s, x[s["k"]], noise_samples, noise_ratio,
                                           noise_seed(seed, ids[s["k"]], s["r"], len(s["units"])))
                for s, f in zip(check, self._check(check, max_units)):
                    if f or len(s["units"]) >= max_units or s.get("stuck"):
                        yield FlipTrace(s["k"], s["r"], np.array(s["units"], dtype=np.int64), bool(f))
                    else:
                        slots.append(s)
                check = []
                if len(slots) >= group_size or not queue:
                    break
            if slots:
                self._advance(slots)

    # -- the steps of :meth:`run`, one search being a dict (target row k, repeat r, zeroed units, ...)
    def _start(self, s: dict) -> dict:
        """A new search ``s``: its unit mask, all kept."""
        s["mask"] = torch.ones(self.structure.n_units, dtype=self.dtype, device=self.device)
        return s

    def _check(self, check: list[dict], max_units: int) -> np.ndarray:
        """Has each search of ``check`` flipped under its current mask? (a forward of the targets only)"""
        out = self._outputs_masked(torch.stack([s["mask"] for s in check]), torch.stack([s["xt"] for s in check]),
                                   self._noised(check))
        return (~self.task.right(out, torch.stack([s["y"] for s in check]))).cpu().numpy()

    def _advance(self, slots: list[dict]) -> None:
        """One greedy step of each search of ``slots``: zero its next unit (or mark it stuck)."""
        masks = torch.stack([s["mask"] for s in slots])
        grad = self._step(slots, masks, torch.stack([s["xt"] for s in slots]), torch.stack([s["y"] for s in slots]))
        for s, j, ok in zip(slots, *self._choose(grad, masks)):
            if ok:
                s["units"].append(j)
                s["mask"][j] = 0
            else:
                s["stuck"] = True

    def _step(self, slots: list[dict], masks: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        """``dO/dmask`` (G, n_units) of the running searches: one forward/backward of every target
        term and of the reference terms not memoised yet."""
        keys, misses, first, repeats, excluded = self._misses(slots)
        _, grad_t, grad_r = self._terms(masks, xt, yt, masks[first], repeats, excluded, emb=self._noised(slots))
        return grad_t + torch.stack(self._remember(keys, misses, grad_r))

    def _misses(self, slots: list[dict]):
        """The memo keys (repeat, excluded target, set of zeroed units) of ``slots`` and the reference
        terms to evaluate: (keys, missing keys, the first slot of each, repeats (M,), excluded (M,))."""
        keys = [(s["r"], s["excluded"], frozenset(s["units"])) for s in slots]
        misses = list(dict.fromkeys(key for key in keys if key not in self._memo))
        first_slot = {key: i for i, key in reversed(list(enumerate(keys)))}
        return (keys, misses, [first_slot[key] for key in misses],
                torch.tensor([key[0] for key in misses], dtype=torch.long, device=self.device),
                torch.tensor([key[1] for key in misses], dtype=torch.long, device=self.device))

    def _remember(self, keys, misses, terms) -> list:
        """Memoise the reference ``terms`` of ``misses`` just evaluated; returns the reference term of
        each of ``keys`` (least recently used terms are dropped beyond the memo's size)."""
        for key, term in zip(misses, terms):
            self._memo[key] = term
        for key in keys:
            self._memo.move_to_end(key)
        found = [self._memo[key] for key in keys]
        while len(self._memo) > self._memo_max:
            self._memo.popitem(last=False)
        self.stats["example_steps"] += len(keys)
        self.stats["reference_evaluations"] += len(misses)
        return found

    def _choose(self, grad: torch.Tensor, masks: torch.Tensor):
        """Per search: the unit to zero next (highest ``mask x dO/dmask`` among kept units; ties to the
        lowest id) and whether to zero it (always, at the unit sites)."""
        best = (grad * masks).masked_fill(masks == 0, float("-inf")).argmax(1).tolist()
        return best, [True] * len(best)

    def zeroing(self, model: nn.Module, mask: torch.Tensor):
        """Context in which ``model`` (of this search's structure) runs with the units ``mask`` zeroed."""
        return unit_masks(model, self.structure, mask, site=self.site)

    def _outputs_masked(self, masks: torch.Tensor, xt: torch.Tensor, emb=None) -> torch.Tensor:
        """Mean outputs (logits) of ``xt`` (G, copies, ...) under ``masks`` (G, n_units) (``emb``: :meth:`_outputs`)."""
        g, nt = xt.shape[:2]
        with torch.no_grad(), unit_masks(self.model, self.structure, masks.repeat_interleave(nt, 0), site=self.site):
            out = self._outputs(xt.flatten(0, 1), emb)
        return out.view(g, nt, *out.shape[1:]).mean(1)

    # -- the cached prefix
    def _prefix_outputs(self):
        """(R, B, ...) outputs of the first unit module on the reference batches (None if unusable)."""
        out = []

        def grab(mod, inp, o):
            out.append(o.detach())

        with torch.no_grad(), hooks_of(self.model, {self.first: grab}):
            self._outputs(self.ref_x.flatten(0, 1))
        if len(out) != 1 or not torch.is_tensor(out[0]) or out[0].shape[0] != self.ref_x.shape[0] * self.ref_x.shape[1]:
            return None    # the module runs more than once per forward (shared weights): no caching
        return out[0].view(*self.ref_x.shape[:2], *out[0].shape[1:])

    def _prefix_agrees(self) -> bool:
        """Does the cached prefix give the plain computation's gradients (models that reuse the input)?"""
        gen = torch.Generator().manual_seed(0)
        g = min(2, self.ref_x.shape[1])
        masks = (torch.rand(g, self.structure.n_units, generator=gen) > 0.2).to(self.device, self.dtype)
        xt = self.ref_x[0, :g, None]
        yt = self.ref_y[0, :g]
        reps = torch.zeros(g, dtype=torch.long, device=self.device)
        tids = torch.full((g,), -1, dtype=torch.long, device=self.device)
        try:
            p1, g1 = self.objective_grad(masks, xt, yt, reps, tids, use_prefix=True)
        except (RuntimeError, ValueError):
            return False
        p0, g0 = self.objective_grad(masks, xt, yt, reps, tids, use_prefix=False)
        tol = 1e-9 if self.dtype == torch.float64 else 1e-4
        if torch.is_autocast_enabled(self.device.type):   # 16-bit products round per batch shape
            tol = 1e-2
        return bool(torch.equal(p0, p1) and torch.allclose(g0, g1, rtol=tol, atol=tol * float(g0.abs().max())))
