"""The weight site one search at a time (models without conv filters: MLPs, transformers).

Each step is the official loop's: zero the search's items in place in a private copy, one forward of
its copies and its reference batch (the prediction, the stop test, comes from it), one backward,
the item with the highest ``weight x gradient`` (:func:`memloc.analyses.flip.weights`). Two things
make it cheaper than that loop, neither changing which item wins:

* **Linear weights are scored by rows, bounded first.** The score of weight ``W[i, j]`` is
  ``W[i, j] * sum_r G[r, i] X[r, j]`` (``G``: the gradient at the layer's output, ``X``: its input,
  ``r`` over the step's rows), at most ``U_i = ||G[:, i]|| * max_j |W[i, j]| ||X[:, j]||`` by
  Cauchy-Schwarz. Every other item is scored exactly first (biases ``b * G.sum(0)``, other
  parameters ``p * grad``); then only the rows whose bound reaches the best score so far (with a
  margin for rounding) get their weight gradient ``G[:, rows]^T X`` and exact scores. Autograd
  computes no weight gradient of a linear layer, only the gradients at its output.
* **The first linear layer's reference rows are computed once** per reference batch (when the
  search has zeroed none of its items): the step's forward runs the target copies alone up to that
  layer and appends the cached reference rows to its output (checked against the plain
  computation at construction, as the unit site's prefix is).

On the MNIST-5k MLP a tenth of the first layer's rows on average (median 2%) and 2% of the
second's reach the bound (the head's items mostly win), so a step costs the forward of the layers
after the first and the backward to the first layer's output.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ...core.units import Hooks

__all__ = ["first_argmax", "DenseSteps"]


def first_argmax(x: torch.Tensor, top: torch.Tensor, chunk: int = 4096) -> int:
    """``int(x.argmax())`` of a 1-D ``x`` whose maximum ``top`` is known (the first index holding it),
    by chunks: ``argmax`` over a long tensor is several times slower than ``amax``."""
    n = x.numel() // chunk * chunk
    if n:
        hit = (x[:n].view(-1, chunk).amax(1) == top).nonzero()
        if len(hit):
            i = int(hit[0]) * chunk
            return i + int(x[i:i + chunk].argmax())
    return n + int(x[n:].argmax())


class DenseSteps:
    """The per-search steps of a :class:`memloc.analyses.flip.weights.WeightFlipSearch` ``search``
    (its private model, item spaces, reference batches and objective)."""

    def __init__(self, search):
        self.search = search
        model, spaces = search.model, search.structure.spaces
        named = dict(model.named_parameters())
        self.params = [named[sp.name] for sp in spaces]      # the parameters with items (all, or a language model's)
        index = {id(p): i for i, p in enumerate(self.params)}
        #: per parameter: (its items as rows of a 2-D view, the original values) for zeroing in place
        self.rows = [(p.detach().view(sp.size, -1), p.detach().clone().view(sp.size, -1))
                     for sp, p in zip(spaces, self.params)]
        users = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                users.setdefault(id(p), []).append(m)
        #: {linear module: (weight's parameter number, bias's or None)}, their items scored by rows
        self.linears = {m: (index[id(m.weight)], index[id(m.bias)] if m.bias is not None else None)
                        for m in model.modules() if type(m) is nn.Linear and id(m.weight) in index
                        and (m.bias is None or id(m.bias) in index)
                        and all(len(users[id(p)]) == 1 for p in m.parameters(recurse=False))}
        self.manual = {i for pair in self.linears.values() for i in pair if i is not None}
        #: large linear layers, scored by bounded rows (small first): their weights' largest values per row
        self.order = sorted((m for m in self.linears if m.weight.numel() > 65536), key=lambda m: m.weight.numel())
        self.top = {m: self._top_weights(m.weight.detach().abs()) for m in self.order}
        self._grad_params()
        self.first, self.prefix = None, None
        if self.linears and not self._agrees(use_prefix=False):
            self._plain()            # a linear weight used outside its module's forward
        elif self.linears and search.task.prefix_cache:      # (a transformer's residual stream has no cut)
            self.first, self.prefix = self._prefix()
            if self.first is not None and not self._agrees(use_prefix=True):
                self.first, self.prefix = None, None

    def _plain(self):
        """Score every parameter from autograd's gradients (no linear layer by rows)."""
        self.linears, self.manual, self.order = {}, set(), []
        self._grad_params()

    def _grad_params(self):
        """Autograd's gradients for the parameters with items that are not scored by rows, none for others."""
        for i, p in enumerate(self.params):
            p.requires_grad_(i not in self.manual)

    # -- one step
    def step(self, s: dict, go_on: bool) -> bool:
        """Has search ``s`` (its copies ``xt``, label ``y``, repeat ``r``, ``zeroed`` items per
        parameter) flipped? If not and ``go_on``, its next item goes to ``s["next"]``:
        (parameter number, item index), or (None, None) if no item scores above 0."""
        search = self.search
        zeroed = [(self.rows[i], torch.tensor(z, dtype=torch.long, device=search.device))
                  for i, z in enumerate(s["zeroed"]) if z]
        use_prefix = self.first is not None and not any(s["zeroed"][i] for i in self.linears[self.first] if i is not None)
        try:
            with torch.no_grad():
                for (row, _), idx in zeroed:
                    row.index_fill_(0, idx, 0)
            with torch.enable_grad():
                logits, records = self._forward(s["xt"], s["r"], use_prefix, s.get("emb"))
                nt = s["xt"].shape[0]
                target = logits[:nt].mean(0, keepdim=True)
                if not bool(search.task.right(target, s["y"][None])[0]):
                    return True
                if not go_on:
                    return False
                dev = search.device
                objective = search._objective(target, s["y"][None], logits[None, nt:], torch.tensor([s["r"]], device=dev),
                                              torch.tensor([s["excluded"]], device=dev))
                s["next"] = self._best(objective, records)
            search.stats["example_steps"] += 1
            search.stats["reference_evaluations"] += 1
            return False
        finally:
            with torch.no_grad():
                for (row, orig), idx in zeroed:
                    row.index_copy_(0, idx, orig.index_select(0, idx))

    def _forward(self, xt: torch.Tensor, r: int, use_prefix: bool, emb=None):
        """Logits of ``xt`` and reference batch ``r`` (one batch, as the official loop) and, per linear
        module, its calls' (input rows, output) for the scores (``emb``: noised token embeddings of ``xt``,
        :meth:`memloc.analyses.flip.search.FlipSearch._outputs`)."""
        records = {m: [] for m in self.linears}

        def record(mod, inp, out):
            x = inp[0]
            if use_prefix and mod is self.first:
                x = torch.cat([x, self.prefix[0][r]])
                out = torch.cat([out, self.prefix[1][r]])
            if not out.requires_grad:          # the first layer's output: a leaf of its own
                out.requires_grad_(True)
            records[mod].append((x.detach().reshape(-1, x.shape[-1]), out))
            return out

        search = self.search
        with Hooks() as h:
            for m in self.linears:
                h.forward(m, record)
            logits = search._outputs(xt if use_prefix else torch.cat([xt, search.ref_x[r]]), emb)
        return logits, records

    def _best(self, objective: torch.Tensor, records: dict) -> tuple:
        """The official rule's choice from the step's gradients (see the module docstring)."""
        outs = [out for calls in records.values() for _, out in calls]
        others = [i for i in range(len(self.params)) if i not in self.manual]
        grads = torch.autograd.grad(objective, outs + [self.params[i] for i in others], allow_unused=True)
        grads_out = iter(grads[:len(outs)])
        with torch.no_grad():
            exact = [(i, (self.params[i] * g).reshape(-1)) for i, g in zip(others, grads[len(outs):]) if g is not None]
            rows = {}
            for m, calls in records.items():
                gs = [(g if g is not None else torch.zeros_like(out)) for g, (_, out) in
                      zip([next(grads_out) for _ in calls], calls)]
                g = gs[0].reshape(-1, m.out_features) if len(gs) == 1 else torch.cat([t.reshape(-1, m.out_features) for t in gs])
                x = calls[0][0] if len(calls) == 1 else torch.cat([x for x, _ in calls])
                w, b = self.linears[m]
                if b is not None:
                    exact.append((b, self.params[b] * g.sum(0)))
                if m in self.top:
                    rows[m] = (g, x)
                else:                   # a small layer: every row exactly
                    exact.append((w, (m.weight.detach() * (g.t() @ x)).reshape(-1)))
            tops = torch.stack([score.max() for _, score in exact]).tolist() if exact else []
            found = [(top, i, score) for top, (i, score) in zip(tops, exact)]
            if rows:
                margin = 1 + 8 * max(len(x) for _, x in rows.values()) * self._eps()
                for m in self.order:
                    best = max([f[0] for f in found], default=0.0)
                    hit = self._rows(m, *rows[m], max(best, 0.0) / margin)
                    if hit is not None:
                        found.append((float(hit[1].max()), self.linears[m][0], hit))
        if not found:
            return None, None
        top, i, score = max(found, key=lambda f: (f[0], -f[1]))
        if not top > 0:
            return None, None
        if isinstance(score, tuple):       # (rows, their scores): the first row holding the top, its first column
            rows_, score = score
            k = int((score.amax(1) == top).nonzero()[0])
            return i, int(rows_[k]) * score.shape[1] + int(score[k].argmax())
        return i, first_argmax(score, torch.tensor(top, dtype=score.dtype)) if len(score) > 65536 else int(score.argmax())

    def _rows(self, m: nn.Linear, g: torch.Tensor, x: torch.Tensor, threshold: float):
        """(rows, their scores (k, in)) of ``m.weight`` whose bound reaches ``threshold`` (every row if it
        is 0), or None; ``g`` (n, out), ``x`` (n, in) the rows of the step."""
        values, columns, rest = self.top[m]
        norms = (x * x).sum(0).sqrt_()          # column norms (``norm(dim=0)`` is ~10x slower on a CPU)
        bound = (g * g).sum(0).sqrt_() * torch.maximum((values * norms[columns]).amax(1), rest * norms.max())
        rows = (bound >= threshold).nonzero()[:, 0] if threshold > 0 else torch.arange(len(bound), device=g.device)
        if not len(rows):
            return None
        return rows, m.weight.detach()[rows] * (g[:, rows].t() @ x)

    @staticmethod
    def _top_weights(w: torch.Tensor, k: int = 8):
        """Per row of ``|W|`` (out, in): its ``k`` largest values (out, k), their columns, and the next
        largest value (out,) (0 if none): ``max_j |W[i, j]| n_j`` is at most the larger of
        ``max over the k of |W[i, j]| n_j`` and ``next[i] * max(n)``, in O(out k) per step."""
        k = min(k, w.shape[1])
        values, columns = w.topk(min(k + 1, w.shape[1]), dim=1)
        rest = values[:, k] if values.shape[1] > k else torch.zeros(len(w), dtype=w.dtype, device=w.device)
        return values[:, :k], columns[:, :k], rest

    def _eps(self) -> float:
        dtypes = [self.search.dtype] + [torch.get_autocast_dtype(d) for d in ("cpu", "cuda")
                                        if torch.is_autocast_enabled(d)]
        return max(torch.finfo(d).eps for d in dtypes)

    # -- the cached first layer and the construction checks
    def _prefix(self):
        """(first linear module, (inputs (R, B, in), outputs (R, B, out)) of its reference rows) or
        (None, None) when the first linear module does not run exactly once per forward."""
        search, calls = self.search, []

        def grab(mod, inp, out):
            calls.append((mod, inp[0].detach(), out.detach()))

        with torch.no_grad(), Hooks() as h:
            for m in self.linears:
                h.forward(m, grab)
            search.model(search.ref_x.flatten(0, 1))
        if not calls or sum(mod is calls[0][0] for mod, _, _ in calls) != 1:
            return None, None
        first, x, out = calls[0]
        n = search.ref_x.shape[:2]
        if x.shape[0] != n[0] * n[1]:
            return None, None
        return first, (x.view(*n, *x.shape[1:]), out.view(*n, *out.shape[1:]))

    def _agrees(self, use_prefix: bool) -> bool:
        """Do the scores of this class equal autograd's ``p x grad`` on a random zeroing (within
        rounding)? ``use_prefix``: with the cached first layer."""
        search = self.search
        gen = torch.Generator().manual_seed(0)
        s = {"xt": search.ref_x[0, :1], "y": search.ref_y[0, 0], "r": 0, "excluded": -1,
             "zeroed": [sorted(set(torch.randint(0, sp.size, (max(1, sp.size // 50),), generator=gen).tolist()))
                        if i not in self.manual or not use_prefix or i not in self.linears.get(self.first, ())
                        else [] for i, sp in enumerate(search.structure.spaces)]}
        got = self._scores(s, use_prefix)
        manual, linears, order, first = self.manual, self.linears, self.order, self.first
        self._plain()
        try:
            want = self._scores(s, False)
        finally:
            self.manual, self.linears, self.order, self.first = manual, linears, order, first
            for i in manual:
                self.params[i].requires_grad_(False)
        if got is None or want is None:
            return False
        tol = 1e-9 if search.dtype == torch.float64 else 1e-4
        return all(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max() + 1e-30)) for a, b in zip(got, want))

    def _scores(self, s: dict, use_prefix: bool):
        """Every item's ``weight x gradient`` (per parameter) at the zeroing of ``s``, or None on error."""
        zeroed = [(self.rows[i], torch.tensor(z, dtype=torch.long)) for i, z in enumerate(s["zeroed"]) if z]
        try:
            with torch.no_grad():
                for (row, _), idx in zeroed:
                    row.index_fill_(0, idx.to(row.device), 0)
            with torch.enable_grad():
                logits, records = self._forward(s["xt"], s["r"], use_prefix)
                objective = logits.logsumexp(-1).sum()
                outs = [out for calls in records.values() for _, out in calls]
                others = [i for i in range(len(self.params)) if i not in self.manual]
                grads = torch.autograd.grad(objective, outs + [self.params[i] for i in others], allow_unused=True)
            scores = [None] * len(self.params)
            for i, g in zip(others, grads[len(outs):]):
                scores[i] = (self.params[i] * g if g is not None else torch.zeros_like(self.params[i])).detach()
            it = iter(grads[:len(outs)])
            for m, calls in records.items():
                g = torch.cat([next(it).reshape(-1, m.out_features) for _ in calls])
                x = torch.cat([x for x, _ in calls])
                w, b = self.linears[m]
                scores[w] = m.weight.detach() * (g.t() @ x)
                if b is not None:
                    scores[b] = m.bias.detach() * g.sum(0)
            return [t.double() for t in scores]
        except (RuntimeError, ValueError, TypeError):
            return None
        finally:
            with torch.no_grad():
                for (row, orig), idx in zeroed:
                    row.index_copy_(0, idx.to(row.device), orig.index_select(0, idx.to(row.device)))
