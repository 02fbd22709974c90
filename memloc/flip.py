"""Greedy gradient-guided unit zeroing: how many units must be zeroed to flip one example?

``python -m memloc.flip RUN --examples noisy:200,clean:200 [--max-units 100] [--repeats 3] ...``

For a target training example ``x`` with given label ``y`` (which the model predicts), repeat:

1. under the example's current unit mask ``m`` (1 = kept, 0 = zeroed), compute the objective
   ``O(m) = mean_b loss(x_b, y_b) - loss(x, y)`` over a reference batch ``b`` of training
   examples (clean ones by default, ``--ref-pool``; the paper's "target weight -B inside a batch mean": gradient *ascent* on the target's
   loss while keeping the reference loss low);
2. if the predicted class of ``x`` is no longer ``y``: stop, the example flipped after ``len(zeroed)``
   units; if ``--max-units`` units are already zeroed: stop, "not flipped";
3. score every kept unit ``j`` by the first-order *decrease* of ``O`` when it is zeroed: zeroing
   changes ``m_j`` by ``-m_j``, so ``O`` changes by about ``-m_j * dO/dm_j``, and the score is
   ``m_j * dO/dm_j`` = activation x gradient of ``O`` summed over spatial positions (what
   :func:`memloc.units.unit_masks` leaves in ``mask.grad``). A high score means zeroing the unit
   raises the target's loss and/or lowers the reference loss. Zero the unit with the highest
   score (already zeroed units are never picked; ties go to the lowest global unit id) and go to 1.

Options: ``--noise-samples n`` replaces the target by ``n`` Gaussian-noised copies whose logits
are averaged (noise norm = ``--noise-ratio`` x input norm, redrawn every step from a seed of
(seed, example id, repeat, step)); ``--repeats R`` runs the search R times with different
reference batches (drawn once per repeat, seeded; the target itself is left out of its own
reference mean).

Many searches run at once (:class:`FlipSearch`): each example of a group has its own mask row; one
forward/backward per step evaluates every example's noisy copies under its mask, and the
reference batch under each example's mask. The reference term depends only on (repeat, set of
zeroed units), so it is memoised: searches that reach the same mask share one evaluation (on the
MNIST-5k lenet run, 743 steps of 199 searches needed 75 reference evaluations). The network up
to the first unit layer is computed once per reference batch. The stopping test is a forward of
the targets alone, so the last step of a search costs no reference evaluation. Finished
searches leave the group and queued ones take their place. With ``--dtype float64`` the unit sequences do not depend on the
group size (the tests check them against a plain one-example-at-a-time implementation).

Results: ``RUN/results/flip.h5`` (see :func:`write_results`): per example ``/examples/{index,
is_noisy, label, status, n_units, flipped, layer_hist, collateral}`` (status 1 = misclassified,
not searched), the ordered unit ids as CSR ``/units/{ids, offsets}``, the unit spaces
``/layers/{names, sizes, offsets}``. The search is resumable: finished searches are saved in atomically written
part files under ``RUN/results/flip.partial/``; rerunning the same command continues where a
killed run stopped, and the parts are merged into ``flip.h5`` at the end.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cli
from .cli import UserError
from .h5 import atomic_h5, put, read_config, write_root_attrs
from .run import SUBSETS, accuracies, load
from .units import Structure, hooks_of, trace, unit_masks, SITES

__all__ = ["select_examples", "reference_batches", "noise_seed", "noisy_copies", "FlipSearch",
           "FlipTrace", "layer_histogram", "write_results", "flip_run", "parse_args", "main",
           "SUBSET_NAMES", "DTYPES", "REF_POOLS"]

SUBSET_NAMES = SUBSETS   # collateral accuracies: clean, noisy, noisy_true, test
DTYPES = {"float32": torch.float32, "float64": torch.float64}
REF_POOLS = ("clean", "all")
EXAMPLE_POOLS = ("noisy", "clean", "any")


# ----------------------------------------------------------------------------- inputs
def select_examples(spec: str, is_noisy: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Training example ids named by ``spec`` (see ``--examples`` in :func:`parse_args`).

    ``spec`` is a comma-separated list of terms: ``noisy:K``, ``clean:K``, ``any:K`` (K examples
    drawn without replacement from that pool with ``seed``; K may be ``all``), an id ``17``, an
    inclusive id range ``10-19``; ``ids:`` may prefix an id term (``ids:1,5,9``). Ids keep the
    order of the terms; an id named twice is kept once, and sampled terms never repeat an id
    chosen by an earlier term. Returns (K,) int64.
    """
    is_noisy = np.asarray(is_noisy, dtype=bool)
    n = len(is_noisy)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    seen: set[int] = set()

    def add(ids):
        for i in ids:
            if int(i) not in seen:
                seen.add(int(i))
                chosen.append(int(i))

    terms = [t.strip() for t in str(spec).split(",")]
    if not spec or not all(terms):
        raise UserError(f"--examples {spec!r}: empty term (expected e.g. noisy:100,clean:100 or ids:1,5,9)")
    for term in terms:
        head, sep, tail = term.partition(":")
        if sep and head in EXAMPLE_POOLS:
            pool = {"noisy": np.flatnonzero(is_noisy), "clean": np.flatnonzero(~is_noisy),
                    "any": np.arange(n)}[head]
            pool = np.array([i for i in pool if i not in seen], dtype=np.int64)
            if tail == "all":
                k = len(pool)
            else:
                try:
                    k = int(tail)
                except ValueError:
                    raise UserError(f"--examples term {term!r}: expected {head}:COUNT or {head}:all") from None
                if k < 1:
                    raise UserError(f"--examples term {term!r}: the count must be at least 1")
            if head == "noisy" and not is_noisy.any():
                raise UserError(f"--examples term {term!r}: this run has no noisy (mislabeled) examples")
            if k > len(pool):
                raise UserError(f"--examples term {term!r}: only {len(pool)} {head} examples are available"
                                f" (use {head}:all for all of them)")
            add(np.sort(rng.choice(pool, size=k, replace=False)) if k < len(pool) else pool)
            continue
        if sep and head != "ids":
            raise UserError(f"--examples term {term!r}: unknown pool {head!r}; valid: "
                            f"{', '.join(EXAMPLE_POOLS)}, ids (e.g. noisy:100, clean:all, ids:1,5,9, 10-19)")
        body = tail if sep else term
        lo, dash, hi = body.partition("-")
        try:
            ids = range(int(lo), int(hi) + 1) if dash else [int(body)]
        except ValueError:
            raise UserError(f"--examples term {term!r} is neither POOL:COUNT nor an example id or id range") from None
        if not len(ids):
            raise UserError(f"--examples term {term!r}: empty id range")
        if any(not 0 <= i < n for i in ids):
            raise UserError(f"--examples term {term!r}: example ids must be in 0..{n - 1} (the run has {n} training examples)")
        add(ids)
    return np.array(chosen, dtype=np.int64)


def reference_batches(pool: np.ndarray, size: int, repeats: int, *, seed: int = 0) -> np.ndarray:
    """(repeats, size) example ids: one reference batch per repeat, drawn without replacement."""
    pool = np.asarray(pool, dtype=np.int64)
    if size < 1 or size > len(pool):
        raise UserError(f"--ref-batch-size must be in 1..{len(pool)} (the size of the reference pool), got {size}")
    rng = np.random.default_rng([seed, 1])
    return np.stack([rng.choice(pool, size=size, replace=False) for _ in range(repeats)])


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


# ----------------------------------------------------------------------------- the search
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

    Parameters
    ----------
    model : classifier; copied, cast to ``dtype``, put in eval mode, parameters frozen.
    ref_x : (R, B, ...) reference inputs, one batch per repeat.
    ref_y : (R, B) their labels.
    ref_ids : (R, B) their example ids (a target is left out of its own reference mean).
    site : ``pre_norm`` | ``post_norm`` (see :func:`memloc.units.unit_masks`).
    dtype : computation dtype; ``torch.float64`` makes results independent of the grouping.
    structure : unit structure of ``model`` (default: traced).
    cache_prefix : compute the network up to the first unit layer once per reference batch
        (checked against the plain computation at construction; off if they differ).
    cache_mb : memory for memoised reference gradients (least recently used are dropped).
    """

    def __init__(self, model: nn.Module, ref_x: torch.Tensor, ref_y: torch.Tensor, ref_ids, *,
                 site: str = "pre_norm", dtype: torch.dtype = torch.float32,
                 structure: Structure | None = None, cache_prefix: bool = True, cache_mb: float = 256):
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; valid: {', '.join(SITES)}")
        device = ref_x.device
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.dtype, self.device, self.site = dtype, device, site
        self.ref_x = ref_x.to(dtype)
        self.ref_y = ref_y.to(device).long()
        self.ref_ids = torch.as_tensor(np.asarray(ref_ids), device=device).long()
        self._ref_sets = [set(row.tolist()) for row in self.ref_ids.cpu()]
        self.structure = structure or trace(self.model, self.ref_x[0, :1])
        if self.structure.n_units == 0:
            raise UserError(f"{type(model).__name__} has no units (no conv/linear layer before the logits)")
        itemsize = torch.finfo(dtype).bits // 8
        self._memo: OrderedDict = OrderedDict()
        self._memo_max = max(64, int(cache_mb * 2 ** 20 / (self.structure.n_units * itemsize)))
        self.stats = {"example_steps": 0, "reference_evaluations": 0}
        self.first = self.structure.spaces[0].module
        self.prefix = None
        if cache_prefix:
            self.prefix = self._prefix_outputs()
            if self.prefix is not None and not self._prefix_agrees():
                self.prefix = None

    # -- one forward/backward
    def _terms(self, masks, xt, yt, ref_masks, ref_repeats, excluded, *, use_prefix=True):
        """Forward/backward of the target term for G searches and the reference term for M masks.

        ``masks`` (G, n_units), ``xt`` (G, copies, ...), ``yt`` (G,); ``ref_masks`` (M, n_units),
        ``ref_repeats`` (M,) reference batch of each, ``excluded`` (M,) example id left out of
        that reference mean (-1: none). Returns ``pred`` (G,) (argmax of the copies' mean logits),
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
                logits = self.model(inputs.to(self.dtype))
            target_logits = logits[:g * nt].view(g, nt, -1).mean(1)
            ref_loss = F.cross_entropy(logits[g * nt:], self.ref_y[ref_repeats].flatten(), reduction="none").view(m, b)
            keep = (self.ref_ids[ref_repeats] != excluded[:, None]).to(self.dtype)
            ref_term = (ref_loss * keep).sum(1) / keep.sum(1).clamp_min(1)
            objective = ref_term.sum() - F.cross_entropy(target_logits, yt, reduction="sum")
            grad_t, grad_r = torch.autograd.grad(objective, [masks, ref_masks])
        return target_logits.argmax(1), grad_t, grad_r

    def objective_grad(self, masks: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                       repeats: torch.Tensor, target_ids: torch.Tensor, *, use_prefix: bool = True):
        """Prediction and ``dO/dmask`` for G searches, without memoisation.

        ``masks`` (G, n_units), ``xt`` (G, copies, ...) target inputs, ``yt`` (G,) labels,
        ``repeats`` (G,) which reference batch, ``target_ids`` (G,). Returns ``pred`` (G,) and
        ``grad`` (G, n_units).
        """
        pred, grad_t, grad_r = self._terms(masks, xt, yt, masks, repeats, target_ids, use_prefix=use_prefix)
        return pred, grad_t + grad_r

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted classes (N,) of inputs ``x`` with no unit zeroed, in the search's dtype."""
        with torch.no_grad():
            return torch.cat([self.model(x[s:s + batch_size].to(self.dtype)).argmax(1)
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
        n_units = self.structure.n_units
        max_units = min(max_units, n_units)
        slots: list[dict] = []
        while queue or slots:
            # check the current masks (a cheap forward of the targets only); finished searches leave,
            # queued ones take their place until the group is full of searches that go on
            check, slots = slots, []
            while True:
                while queue and len(slots) + len(check) < group_size:
                    k, r = queue.popleft()
                    excluded = int(ids[k]) if int(ids[k]) in self._ref_sets[r] else -1
                    check.append({"k": k, "r": r, "units": [], "excluded": excluded,
                                  "mask": torch.ones(n_units, dtype=self.dtype, device=self.device)})
                if not check:
                    break
                for s in check:
                    s["xt"] = (noisy_copies(x[s["k"]].to(self.dtype), noise_samples, noise_ratio,
                                            noise_seed(seed, ids[s["k"]], s["r"], len(s["units"])))
                               if noise_samples else x[s["k"]][None].to(self.dtype))
                pred = self._predict_masked(torch.stack([s["mask"] for s in check]),
                                            torch.stack([s["xt"] for s in check]))
                flipped = (pred != y[[s["k"] for s in check]]).cpu().numpy()
                for s, f in zip(check, flipped):
                    if f or len(s["units"]) >= max_units:
                        yield FlipTrace(s["k"], s["r"], np.array(s["units"], dtype=np.int64), bool(f))
                    else:
                        slots.append(s)
                check = []
                if len(slots) >= group_size or not queue:
                    break
            if not slots:
                continue
            # one forward/backward: every target term, and the reference terms not memoised yet
            masks = torch.stack([s["mask"] for s in slots])
            keys = [(s["r"], s["excluded"], frozenset(s["units"])) for s in slots]
            misses = list(dict.fromkeys(key for key in keys if key not in self._memo))
            first_slot = {key: i for i, key in reversed(list(enumerate(keys)))}
            _, grad_t, grad_r = self._terms(
                masks, torch.stack([s["xt"] for s in slots]), y[[s["k"] for s in slots]],
                masks[[first_slot[key] for key in misses]],
                torch.tensor([key[0] for key in misses], dtype=torch.long, device=self.device),
                torch.tensor([key[1] for key in misses], dtype=torch.long, device=self.device))
            for key, grad in zip(misses, grad_r):
                self._memo[key] = grad
            for key in keys:
                self._memo.move_to_end(key)
            grad = grad_t + torch.stack([self._memo[key] for key in keys])
            while len(self._memo) > self._memo_max:
                self._memo.popitem(last=False)
            self.stats["example_steps"] += len(slots)
            self.stats["reference_evaluations"] += len(misses)
            best = (grad * masks).masked_fill(masks == 0, float("-inf")).argmax(1).tolist()
            for s, j in zip(slots, best):
                s["units"].append(j)
                s["mask"][j] = 0

    def _predict_masked(self, masks: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """Argmax of the mean logits of ``xt`` (G, copies, ...) under ``masks`` (G, n_units)."""
        g, nt = xt.shape[:2]
        with torch.no_grad(), unit_masks(self.model, self.structure, masks.repeat_interleave(nt, 0), site=self.site):
            return self.model(xt.flatten(0, 1)).view(g, nt, -1).mean(1).argmax(1)

    # -- the cached prefix
    def _prefix_outputs(self):
        """(R, B, ...) outputs of the first unit module on the reference batches (None if unusable)."""
        out = []

        def grab(mod, inp, o):
            out.append(o.detach())

        with torch.no_grad(), hooks_of(self.model, {self.first: grab}):
            self.model(self.ref_x.flatten(0, 1))
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
        return bool(torch.equal(p0, p1) and torch.allclose(g0, g1, rtol=tol, atol=tol * float(g0.abs().max())))


# ----------------------------------------------------------------------------- records
def layer_histogram(units: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Zeroed units per unit space for CSR rows: ``units`` flat ids, row ``offsets`` (M+1,),
    unit-space ``lengths`` (L,) in id order. Returns (M, L) int32."""
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    space = np.searchsorted(bounds, units, side="right") - 1
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    hist = np.zeros((len(offsets) - 1, len(lengths)), dtype=np.int32)
    np.add.at(hist, (row, space), 1)
    return hist


def _csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return flat, offsets


def write_results(path, *, index, is_noisy, label, status, n_units, flipped, units, structure: Structure,
                  collateral, references, config: dict, argv=None) -> None:
    """Write ``flip.h5`` atomically.

    ``index``/``is_noisy``/``label``/``status`` (K,); ``n_units``/``flipped`` (K, R); ``units``: K*R
    arrays of unit ids (example-major, repeat-minor); ``collateral`` (K, R, 4); ``references``
    (R, B) reference batch ids. Layout: ``/examples/{index, is_noisy, label, status, n_units,
    flipped, layer_hist, collateral}``, ``/units/{ids, offsets}`` (CSR over the K*R rows),
    ``/layers/{names, sizes, offsets}`` (unit spaces), ``/subsets/names``, ``/reference/index``.
    """
    k, r = np.shape(n_units)
    flat, offsets = _csr(list(units))
    sizes = np.array([s.size for s in structure.spaces], dtype=np.int64)
    with atomic_h5(path) as f:
        write_root_attrs(f, "memloc.flip", config, argv)
        ex = f.create_group("examples")
        put(ex, "index", np.asarray(index, dtype=np.int64), dims=["example"])
        put(ex, "is_noisy", np.asarray(is_noisy, dtype=bool), dims=["example"])
        put(ex, "label", np.asarray(label, dtype=np.int64), dims=["example"], description="given label searched")
        put(ex, "status", np.asarray(status, dtype=np.int8), dims=["example"],
            description="0 = searched, 1 = the model misclassifies it (not searched)")
        put(ex, "n_units", np.asarray(n_units, dtype=np.int32), dims=["example", "repeat"])
        put(ex, "flipped", np.asarray(flipped, dtype=bool), dims=["example", "repeat"])
        put(ex, "layer_hist", layer_histogram(flat, offsets, sizes).reshape(k, r, len(sizes)),
            dims=["example", "repeat", "layer"])
        put(ex, "collateral", np.asarray(collateral, dtype=np.float64), dims=["example", "repeat", "subset"])
        u = f.create_group("units")
        put(u, "ids", flat, dims=["zeroed"], description="global unit ids, in zeroing order")
        put(u, "offsets", offsets, dims=["row"], description="row example*R + repeat spans ids[offsets[row]:offsets[row+1]]")
        lay = f.create_group("layers")
        put(lay, "names", [s.name for s in structure.spaces], dims=["layer"])
        put(lay, "sizes", sizes, dims=["layer"])
        put(lay, "offsets", np.array([s.offset for s in structure.spaces], dtype=np.int64), dims=["layer"])
        put(f.create_group("subsets"), "names", list(SUBSET_NAMES), dims=["subset"])
        put(f.create_group("reference"), "index", np.asarray(references, dtype=np.int64), dims=["repeat", "ref"])


# ----------------------------------------------------------------------------- resumable parts
def _write_part(folder: Path, number: int, traces: list[FlipTrace], collateral: list, ids) -> None:
    """Save finished searches atomically as ``part_NNNNNN.h5`` (the unit of resumption)."""
    flat, offsets = _csr([t.units for t in traces])
    with atomic_h5(folder / f"part_{number:06d}.h5") as f:
        put(f, "example", np.array([ids[t.k] for t in traces], dtype=np.int64), dims=["search"])
        put(f, "repeat", np.array([t.repeat for t in traces], dtype=np.int64), dims=["search"])
        put(f, "flipped", np.array([t.flipped for t in traces], dtype=bool), dims=["search"])
        put(f, "collateral", np.array(collateral, dtype=np.float64).reshape(-1, len(SUBSET_NAMES)), dims=["search", "subset"])
        put(f, "ids", flat, dims=["zeroed"])
        put(f, "offsets", offsets, dims=["row"])


def _read_parts(folder: Path) -> dict[tuple[int, int], tuple[np.ndarray, bool, np.ndarray]]:
    """{(example id, repeat): (unit ids, flipped, collateral)} of every saved part."""
    done = {}
    for p in sorted(folder.glob("part_*.h5")):
        try:
            with h5py.File(p, "r") as f:
                ex, rep, fl, col = f["example"][:], f["repeat"][:], f["flipped"][:], f["collateral"][:]
                flat, off = f["ids"][:], f["offsets"][:]
        except (OSError, KeyError) as e:
            raise UserError(f"cannot read partial result {str(p)!r} ({e}); delete it to redo its searches") from None
        for i in range(len(ex)):
            done[(int(ex[i]), int(rep[i]))] = (flat[off[i]:off[i + 1]], bool(fl[i]), col[i])
    return done


def _settings_match(path: Path, config: dict) -> bool:
    """Are the settings stored in ``path`` (flip.h5 config or partial settings.json) ``config``?"""
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                stored = read_config(f)
        else:
            stored = json.loads(path.read_text())
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"cannot read {str(path)!r} ({e}); use --overwrite to replace it") from None
    return json.loads(json.dumps(config, sort_keys=True, default=str)) == stored


# ----------------------------------------------------------------------------- the run-level driver
def flip_run(run_dir, *, examples: str = "noisy:100,clean:100", max_units: int = 100,
             noise_samples: int = 0, noise_ratio: float = 0.01, repeats: int = 1, site: str = "pre_norm",
             epoch: int | None = None, collateral: bool = False, group_size: int = 32,
             ref_batch_size: int = 64, ref_pool: str = "clean", seed: int = 0, dtype: str = "float32",
             device="cpu", overwrite: bool = False, argv=None, log=None) -> Path:
    """Search the examples of a run directory and write ``RUN/results/flip.h5`` (resumable).

    Returns the path of the results file. See :func:`parse_args` for the options.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if max_units < 1 or repeats < 1 or group_size < 1 or noise_samples < 0 or noise_ratio < 0:
        raise UserError("--max-units, --repeats and --group-size must be at least 1; "
                        "--noise-samples and --noise-ratio must not be negative")
    if site not in SITES:
        raise UserError(f"unknown --site {site!r}; valid: {', '.join(SITES)}")
    if ref_pool not in REF_POOLS:
        raise UserError(f"unknown --ref-pool {ref_pool!r}; valid: {', '.join(REF_POOLS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    run = load(run_dir)
    device = cli.resolve_device(device)
    epoch = run.final_epoch if epoch is None else int(epoch)
    ids = select_examples(examples, run.is_noisy, seed=seed)
    pool = np.arange(run.num_train) if ref_pool == "all" else np.flatnonzero(~run.is_noisy)
    refs = reference_batches(pool, ref_batch_size, repeats, seed=seed)
    config = {"epoch": epoch, "site": site, "max_units": max_units, "repeats": repeats,
              "noise_samples": noise_samples, "noise_ratio": noise_ratio, "ref_batch_size": ref_batch_size,
              "ref_pool": ref_pool, "seed": seed, "examples": examples, "dtype": dtype,
              "collateral": collateral, "num_examples": len(ids)}
    out = run.results_path("flip")
    partial = out.with_name("flip.partial")
    settings = {**config, "example_ids": ids.tolist()}
    if out.exists() and not overwrite:
        if _settings_match(out, config):
            log(f"memloc.flip: {out} is already complete for these settings (nothing to do)")
            return out
        raise UserError(f"{str(out)!r} exists with different settings; use --overwrite to replace it")
    stale = partial.exists() and (overwrite or not (partial / "settings.json").exists())
    if partial.exists() and not stale and not _settings_match(partial / "settings.json", settings):
        raise UserError(f"an interrupted search with different settings is saved in {str(partial)!r}; "
                        "rerun it with its settings to continue, or use --overwrite to start again")

    model = run.model(epoch, device=device)
    data = run.data(device)
    train = data.train
    x, y = train.x[ids], train.y[ids]
    ridx = torch.as_tensor(refs, device=device)
    search = FlipSearch(model, train.x[ridx], train.y[ridx], refs, site=site, dtype=DTYPES[dtype])
    structure = search.structure
    status = (search.predict(x) != y).cpu().numpy().astype(np.int8)
    if status.any():
        log(f"memloc.flip: {int(status.sum())} of {len(ids)} examples are misclassified by the model "
            "and are recorded with status 1 (not searched)")
    if stale:
        shutil.rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        tmp = partial / "settings.json.tmp"
        tmp.write_text(json.dumps(settings, sort_keys=True, default=str))
        os.replace(tmp, partial / "settings.json")
    done = _read_parts(partial)
    todo = [(k, r) for k in np.flatnonzero(status == 0) for r in range(repeats) if (int(ids[k]), r) not in done]
    if done:
        log(f"memloc.flip: resuming: {len(done)} searches already saved, {len(todo)} to go")
    part_no = max([int(p.stem.split("_")[1]) + 1 for p in partial.glob("part_*.h5")], default=0)
    pending: list[FlipTrace] = []
    pending_col: list = []
    last = time.monotonic()

    def flush():
        nonlocal part_no, pending, pending_col, last
        if pending:
            _write_part(partial, part_no, pending, pending_col, ids)
            for t, c in zip(pending, pending_col):
                done[(int(ids[t.k]), t.repeat)] = (t.units, t.flipped, np.asarray(c))
            part_no += 1
            pending, pending_col = [], []
        last = time.monotonic()

    bar = cli.progress(total=len(todo), desc="flip", unit="search")
    try:
        for t in search.run(x, y, ids, todo, max_units=max_units, noise_samples=noise_samples,
                            noise_ratio=noise_ratio, seed=seed, group_size=group_size):
            col = np.full(len(SUBSET_NAMES), np.nan)
            if collateral:
                mask = torch.ones(structure.n_units, device=device)
                mask[torch.as_tensor(t.units, device=device)] = 0
                with unit_masks(model, structure, mask, site=site):
                    acc = accuracies(model, data)
                col = np.array([acc[s] for s in SUBSET_NAMES])
            pending.append(t)
            pending_col.append(col)
            bar.update(1)
            if len(pending) >= group_size or time.monotonic() - last > 30:
                flush()
        flush()
    except KeyboardInterrupt:
        flush()
        raise
    finally:
        bar.close()

    rows_units, n_units, flipped = [], np.zeros((len(ids), repeats), np.int32), np.zeros((len(ids), repeats), bool)
    col = np.full((len(ids), repeats, len(SUBSET_NAMES)), np.nan)
    for k, i in enumerate(ids):
        for r in range(repeats):
            units, f, c = done.get((int(i), r), (np.zeros(0, np.int64), False, col[k, r]))
            rows_units.append(units)
            n_units[k, r], flipped[k, r], col[k, r] = len(units), f, c
    write_results(out, index=ids, is_noisy=run.is_noisy[ids], label=run.label_given[ids], status=status,
                  n_units=n_units, flipped=flipped, units=rows_units, structure=structure, collateral=col,
                  references=refs, config=config, argv=argv)
    shutil.rmtree(partial)
    return out


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = cli.parser("memloc.flip", "Greedy gradient-guided unit zeroing: for each example, zero units one "
                   "at a time (the one whose zeroing most raises the example's loss relative to a reference "
                   "batch's loss, to first order) until the prediction changes. Writes RUN/results/flip.h5; "
                   "an interrupted run continues when the same command is run again.")
    p.add_argument("run", metavar="RUN", help="run directory written by memloc.train")
    p.add_argument("--examples", default="noisy:100,clean:100",
                   help="which training examples to search: comma-separated terms, each POOL:COUNT (POOL = noisy, "
                        "clean or any; COUNT a number or 'all'; drawn with --seed), an example id (17), an inclusive "
                        "id range (10-19), or ids prefixed by 'ids:' (ids:1,5,9). Examples the model misclassifies "
                        "are recorded with status 1 and not searched")
    p.add_argument("--max-units", type=int, default=100,
                   help="give up after zeroing this many units (recorded as not flipped)")
    p.add_argument("--noise-samples", type=int, default=0,
                   help="average the target's logits over this many Gaussian-noised copies of it (0 = off)")
    p.add_argument("--noise-ratio", type=float, default=0.01, help="noise norm as a fraction of the input's norm")
    p.add_argument("--repeats", type=int, default=1, help="searches per example, each with its own reference batch")
    p.add_argument("--ref-batch-size", type=int, default=64,
                   help="reference batch size B (the objective is the reference batch's mean loss minus the "
                        "example's loss)")
    p.add_argument("--ref-pool", default="clean", choices=REF_POOLS,
                   help="draw reference batches from clean training examples or from all of them")
    p.add_argument("--site", default="pre_norm", choices=SITES,
                   help="zero a unit at its layer's output (pre_norm) or after the norm that follows it (post_norm)")
    p.add_argument("--epoch", type=int, default=None, help="checkpoint to analyse (default: the final one)")
    p.add_argument("--collateral", action="store_true",
                   help="also record clean-train / noisy-train / noisy-true / test accuracy with each example's "
                        "units zeroed (one pass over the data per search)")
    p.add_argument("--group-size", type=int, default=32,
                   help="searches run at once (memory grows with group size x (B + copies))")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="computation precision; float64 makes the unit sequences independent of --group-size "
                        "and of interruptions (near-ties are not decided by rounding), at 2-4x the CPU time")
    p.add_argument("--seed", type=int, default=0, help="seed of example sampling, reference batches and noise")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing flip.h5 (or an interrupted search) made with other settings")
    cli.add_device_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    with cli.user_errors("memloc.flip"):
        args = parse_args(argv)
        out = flip_run(args.run, examples=args.examples, max_units=args.max_units,
                       noise_samples=args.noise_samples, noise_ratio=args.noise_ratio, repeats=args.repeats,
                       site=args.site, epoch=args.epoch, collateral=args.collateral, group_size=args.group_size,
                       ref_batch_size=args.ref_batch_size, ref_pool=args.ref_pool, seed=args.seed,
                       dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                       argv=sys.argv if argv is None else ["memloc.flip", *argv])
        print(out)


if __name__ == "__main__":
    main()
