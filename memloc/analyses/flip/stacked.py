"""The weight site for models made of linear layers only (MLPs): a group of searches in one pass.

Every search's weights are the shared ones less a few zeroed items, so the group runs as one
model: one forward of every search's target copies and reference rows through the shared weights
(large matrix products in place of one small product per search), each search's zeroed items
taken out of its own rows' layer outputs (``out[rows, i] -= x[rows, j] * W[i, j]`` for a zeroed
``W[i, j]``, ``- b[i]`` for a zeroed bias), and one backward of the sum of the searches'
objectives. The first linear layer's reference rows are computed once per reference batch (the
corrections apply to them as well). Scores as :class:`memloc.analyses.flip.dense.DenseSteps`:
biases and small layers exactly, large layers by the rows whose Cauchy-Schwarz bound reaches the
search's best score so far. Checked at construction against the one-search-at-a-time
computation on a random zeroing; that path is used where they differ or the model has other
parameters.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...core.units import Hooks
from .dense import first_argmax

__all__ = ["StackedSteps"]


class _Inputs:
    """A linear layer's input rows for G searches: ``x`` (G, n, in), then (first layer) each search's
    cached reference rows ``ref[r[g]]`` (B, in) without copying them G times."""

    def __init__(self, x: torch.Tensor, ref: torch.Tensor | None = None, r: torch.Tensor | None = None,
                 ref_sq: torch.Tensor | None = None):
        self.x, self.ref, self.r, self.ref_sq = x, ref, r, ref_sq

    def columns(self, g: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(Z, n + B): column ``j[z]`` of search ``g[z]``'s rows."""
        cols = self.x[g, :, j]
        return cols if self.ref is None else torch.cat([cols, self.ref[self.r[g], :, j]], 1)

    def norms(self) -> torch.Tensor:
        """(G, in) column norms of each search's rows."""
        sq = (self.x * self.x).sum(1)
        return (sq if self.ref is None else sq + self.ref_sq[self.r]).sqrt_()

    def product(self, k: int, g: torch.Tensor) -> torch.Tensor:
        """``g^T X_k`` for search ``k``'s rows X_k and ``g`` (n + B, m)."""
        if self.ref is None:
            return g.t() @ self.x[k]
        n = self.x.shape[1]
        return g[:n].t() @ self.x[k] + g[n:].t() @ self.ref[int(self.r[k])]

    def full(self) -> torch.Tensor:
        """(G, n + B, in): every search's rows."""
        return self.x if self.ref is None else torch.cat([self.x, self.ref[self.r]], 1)


class StackedSteps:
    """The steps of a group of searches at once, for a :class:`DenseSteps` ``dense`` whose model's
    parameters all belong to linear layers, each called once per forward. ``usable`` says whether
    it may be used (False: use ``dense``)."""

    def __init__(self, dense):
        self.dense, self.search = dense, dense.search
        self.linears = list(dense.linears)
        self.usable = (dense.first is not None and dense.manual == set(range(len(dense.params)))
                       and self._once())
        if self.usable:
            px = dense.prefix[0]
            self.ref_sq = (px * px).sum(1)              # (repeats, in)
            self.usable = self._agrees()

    # -- one group step
    def check(self, group: list[dict], go_on: list[bool]) -> np.ndarray:
        """Has each search of ``group`` flipped? Those that have not and ``go_on`` get ``s["next"]``
        (parameter number, item index) or (None, None), as :meth:`DenseSteps.step`."""
        search, dev = self.search, self.search.device
        zeroed = self._zeroed(group)
        with torch.enable_grad():
            logits, records = self._forward(group, zeroed)
            nt = group[0]["xt"].shape[0]
            target = logits[:, :nt].mean(1)
            y = torch.stack([s["y"] for s in group])
            flipped = (target.argmax(1) != y).cpu().numpy()
            go = [i for i, (f, g) in enumerate(zip(flipped, go_on)) if g and not f]
            if not go:
                return flipped
            rows = torch.tensor(go, device=dev)
            objective = search._objective(target[rows], y[rows], logits[rows, nt:],
                                          torch.tensor([group[i]["r"] for i in go], device=dev),
                                          torch.tensor([group[i]["excluded"] for i in go], device=dev))
            grads = torch.autograd.grad(objective, [records[m][1] for m in self.linears])
        for i, choice in zip(go, self._choose(go, records, grads, zeroed, len(group))):
            group[i]["next"] = choice
        search.stats["example_steps"] += len(go)
        search.stats["reference_evaluations"] += len(go)
        return flipped

    def _forward(self, group: list[dict], zeroed: dict):
        """Logits (G, copies + B, C) of every search's copies and reference batch under its zeroed
        items, and per linear module (its :class:`_Inputs`, its output rows (G * (copies + B), out))."""
        dense, g = self.dense, len(group)
        xt = torch.stack([s["xt"] for s in group])
        r = torch.tensor([s["r"] for s in group], device=self.search.device)
        records = {}

        def hook(mod, inp, out):
            x = inp[0]
            if mod is dense.first:
                px, pout = dense.prefix
                rows = _Inputs(x.reshape(g, -1, x.shape[-1]), px, r, self.ref_sq)
                ref_out = pout[r] if len(set(r.tolist())) > 1 else pout[r[0]].expand(g, *pout.shape[1:])
                out = torch.cat([out.reshape(g, -1, out.shape[-1]), ref_out], 1).flatten(0, 1).requires_grad_(True)
            else:
                rows = _Inputs(x.reshape(g, -1, x.shape[-1]))    # with its graph: the corrections pass gradients to it
            out = self._correct(mod, rows, out, g, zeroed.get(mod))
            records[mod] = (rows, out)
            return out

        with Hooks() as h:
            for m in self.linears:
                h.forward(m, hook)
            logits = self.search.model(xt.flatten(0, 1))
        return logits.view(g, -1, logits.shape[-1]), records

    def _zeroed(self, group: list[dict]) -> dict:
        """{linear module: ((search, row, column) of zeroed weights, (search, row) of zeroed biases)}."""
        out, dev = {}, self.search.device
        for m, (w, b) in self.dense.linears.items():
            wz = [(k, j) for k, s in enumerate(group) for j in s["zeroed"][w]]
            bz = [(k, j) for k, s in enumerate(group) for j in s["zeroed"][b]] if b is not None else []
            if wz or bz:
                wz = torch.tensor(wz, dtype=torch.long, device=dev).view(-1, 2)
                bz = torch.tensor(bz, dtype=torch.long, device=dev).view(-1, 2)
                out[m] = ((wz[:, 0], wz[:, 1] // m.in_features, wz[:, 1] % m.in_features), (bz[:, 0], bz[:, 1]))
        return out

    @staticmethod
    def _correct(m: nn.Linear, rows: _Inputs, out: torch.Tensor, g: int, zeroed) -> torch.Tensor:
        """``out`` (G * n, out) without each search's zeroed items of ``m``."""
        if zeroed is None:
            return out
        (wg, wi, wj), (bg, bi) = zeroed
        out3 = out.view(g, -1, out.shape[-1]).transpose(1, 2)          # (G, out, n)
        if len(wg):
            out3 = out3.index_put((wg, wi), -rows.columns(wg, wj) * m.weight.detach()[wi, wj][:, None], accumulate=True)
        if len(bg):
            out3 = out3.index_put((bg, bi), -m.bias.detach()[bi][:, None].expand(-1, out3.shape[-1]), accumulate=True)
        return out3.transpose(1, 2).reshape(out.shape)

    def _choose(self, go: list[int], records: dict, grads, zeroed: dict, g: int) -> list:
        """Per search ``go[k]`` of the group of ``g``: the official rule's choice."""
        dense = self.dense
        with torch.no_grad():
            parts, large = [], []
            for m, grad in zip(self.linears, grads):
                w, b = dense.linears[m]
                rows, grad = records[m][0], grad.view(g, -1, grad.shape[-1])
                wz, bz = zeroed.get(m, ((), ()))
                if b is not None:
                    parts.append((b, self._zero(m.bias.detach() * grad.sum(1), bz)))
                if m in dense.top:
                    large.append((m, grad, rows, wz))
                else:
                    score = m.weight.detach() * torch.bmm(grad.transpose(1, 2), rows.full())
                    parts.append((w, self._zero(score, wz).flatten(1)))
            tops = torch.stack([score.amax(1) for _, score in parts], 1)[go].tolist() if parts else [[] for _ in go]
            found = {k: [(t, i, score[k], None) for t, (i, score) in zip(top, parts)] for k, top in zip(go, tops)}
            margin = 1 + 8 * max((grad.shape[1] for _, grad, _, _ in large), default=1) * dense._eps()
            for m, grad, rows, wz in sorted(large, key=lambda t: t[0].weight.numel()):     # small layers first
                self._large(m, grad, rows, wz, found, margin)
        return [self._pick(found[k]) for k in go]

    @staticmethod
    def _zero(score: torch.Tensor, items) -> torch.Tensor:
        """``score`` (G, ...) with the zeroed ``items`` (index tensors: search, ...) at 0."""
        if len(items) and len(items[0]):
            score = score.index_put(tuple(items), torch.zeros((), dtype=score.dtype, device=score.device))
        return score

    def _large(self, m: nn.Linear, grad: torch.Tensor, rows: _Inputs, wz, found: dict, margin: float) -> None:
        """Add to ``found[k]`` the best item of ``m.weight`` for search k among the rows whose bound
        reaches its best score so far (:meth:`DenseSteps._rows`), exact rows one search at a time."""
        values, columns, rest = self.dense.top[m]
        go = list(found)
        sel = torch.tensor(go, device=grad.device)
        norms = rows.norms()[sel]                                            # (n, in)
        g = grad[sel]
        bound = (g * g).sum(1).sqrt_() * torch.maximum(
            (values * norms[:, columns]).amax(2), rest * norms.amax(1, keepdim=True))       # (n, out)
        best = torch.tensor([max([f[0] for f in found[k]], default=0.0) for k in go], dtype=bound.dtype,
                            device=bound.device).clamp_min(0) / margin
        hits = ((bound >= best[:, None]) | (best[:, None] == 0)).nonzero()
        if not len(hits):
            return
        w = self.dense.linears[m][0]
        for n, picked in zip(go, hits[:, 1].split(torch.bincount(hits[:, 0], minlength=len(go)).tolist())):
            if len(picked):
                score = m.weight.detach()[picked] * rows.product(n, grad[n][:, picked])
                if len(wz) and len(wz[0]):
                    mine = wz[0] == n
                    at = (wz[1][mine][:, None] == picked[None]).nonzero()      # (zeroed item, its row's position)
                    if len(at):
                        score = score.index_put((at[:, 1], wz[2][mine][at[:, 0]]),
                                                torch.zeros((), dtype=score.dtype, device=score.device))
                found[n].append((float(score.max()), w, score, picked))

    @staticmethod
    def _pick(found: list) -> tuple:
        """(parameter number, item index) of the highest score (first parameter, first item), or
        (None, None) if none is above 0."""
        if not found:
            return None, None
        top, i, score, rows = max(found, key=lambda f: (f[0], -f[1]))
        if not top > 0:
            return None, None
        if rows is not None:            # the first row holding the top, its first column
            k = int((score.amax(1) == top).nonzero()[0])
            return i, int(rows[k]) * score.shape[1] + int(score[k].argmax())
        if len(score) > 65536:
            return i, first_argmax(score, torch.tensor(top, dtype=score.dtype))
        return i, int(score.argmax())

    # -- construction checks
    def _once(self) -> bool:
        """Does every linear module run exactly once per forward (and the first one first)?"""
        calls = []
        with torch.no_grad(), Hooks() as h:
            for m in self.linears:
                h.forward(m, lambda mod, inp, out: calls.append(mod))
            self.search.model(self.search.ref_x[0, :1])
        return sorted(map(id, calls)) == sorted(map(id, self.linears)) and calls[0] is self.dense.first

    def _agrees(self) -> bool:
        """Are every item's scores of two searches at random zeroings, stacked, those of
        :meth:`DenseSteps._scores` (autograd on the zeroed weights), within rounding?"""
        search, dense = self.search, self.dense
        gen = torch.Generator().manual_seed(1)
        group = [{"xt": search.ref_x[0, k:k + 1], "r": 0,
                  "zeroed": [sorted(set(torch.randint(0, sp.size, (max(1, sp.size // 100),), generator=gen).tolist()))
                             for sp in search.structure.spaces]} for k in range(min(2, search.ref_x.shape[1]))]
        try:
            zeroed = self._zeroed(group)
            with torch.enable_grad():
                logits, records = self._forward(group, zeroed)
                grads = torch.autograd.grad(logits.logsumexp(-1).sum(), [records[m][1] for m in self.linears])
            got = [[None] * len(dense.params) for _ in group]
            with torch.no_grad():
                for m, grad in zip(self.linears, grads):
                    w, b = dense.linears[m]
                    grad, (wz, bz) = grad.view(len(group), -1, grad.shape[-1]), zeroed.get(m, ((), ()))
                    weight = self._zero(m.weight.detach() * torch.bmm(grad.transpose(1, 2), records[m][0].full()), wz)
                    for k in range(len(group)):
                        got[k][w] = weight[k]
                        if b is not None:
                            got[k][b] = self._zero(m.bias.detach() * grad.sum(1), bz)[k]
            want = [dense._scores(s, False) for s in group]
        except (RuntimeError, ValueError, IndexError):
            return False
        if any(w is None for w in want):
            return False
        tol = 1e-9 if search.dtype == torch.float64 else 1e-4
        return all(torch.allclose(a.double(), b, rtol=tol, atol=tol * float(b.abs().max() + 1e-30))
                   for gk, wk in zip(got, want) for a, b in zip(gk, wk))
