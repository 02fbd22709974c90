"""The weight site for conv nets: every search of a group at once under ``vmap``.

Each search carries a mask per parameter (1 = kept). ``torch.func.functional_call`` under ``vmap``
runs every search's copies (and the reference batches not memoised yet) through its own weights
in one forward, with two exceptions that keep the convolutions and matrix products shared:

* a conv filter's mask scales its output channel (``conv(x, W * m) + b = m * conv(x, W) + b``):
  the conv runs with the shared weight and no bias, a forward hook applies the mask and the
  search's masked bias, and the mask's gradient comes from that product;
* a linear layer runs with the shared weight; each search's zeroed weights are taken out of its
  output (``out[:, i] -= x[:, j] * W[i, j]``, index lists padded across the group), a zero
  "probe" added to the output gives the gradient ``G`` there, and the weights' scores are
  ``W * (G^T x)`` per search.

Both are checked at construction against masking every weight on random masks (the plain path is
used where they differ). The check's forward of the targets is the step's target term; reference
terms are memoised per (repeat, excluded target, zeroed items); per search the official rule picks
the item of highest ``weight x gradient``.
"""
from __future__ import annotations

import bisect

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from ...core.units import hooks_of

__all__ = ["BatchedSteps"]


class BatchedSteps:
    """The steps of a :class:`memloc.analyses.flip.weights.WeightFlipSearch` ``search`` on a conv net."""

    def __init__(self, search):
        self.search = search
        self.spaces = search.structure.spaces
        self.offsets = [sp.offset for sp in self.spaces]
        model = search.model
        self.params = {k: v.detach() for k, v in model.named_parameters()}
        self.buffers = dict(model.named_buffers())
        self.vmap = True
        self.fallback = None         # why vmap was given up for a loop over the searches (None: it was not)
        self.slice = None
        self._hook_modules()

    # -- the hooked modules
    def _hook_modules(self) -> None:
        """``convs`` / ``linears``: {module name: (weight name, bias name or None)} run with shared
        weights (``fixed``: the tensors passed for them); ``masked``: the parameters with mask leaves."""
        convs, linears = {}, {}
        for name, m in self.search.model.named_modules():
            weight = f"{name}.weight" if name else "weight"
            if weight not in self.params:
                continue
            bias = weight[:-6] + "bias" if getattr(m, "bias", None) is not None else None
            if bias is not None and bias not in self.params:
                continue                     # a bias shared with another module: masked as it is
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
                convs[name] = (weight, bias)
            elif type(m) is nn.Linear:
                linears[name] = (weight, bias)
        self._use(convs, linears)
        if (convs or linears) and not self._agrees():
            self._use({}, {})

    def _use(self, convs: dict, linears: dict) -> None:
        self.convs, self.linears = convs, linears
        self.fixed = {}
        for weight, bias in list(convs.values()) + list(linears.values()):
            self.fixed[weight] = self.params[weight]
            if bias is not None:
                self.fixed[bias] = torch.zeros_like(self.params[bias])
        self.lin_weights = {w: name for name, (w, _) in linears.items()}
        self.masked = [sp.name for sp in self.spaces if sp.name not in self.lin_weights]
        self.lin_shapes = self._output_shapes() if linears else {}

    def _output_shapes(self) -> dict:
        """{linear weight name: the shape of one row's output} (for the probes)."""
        shapes = {}
        hooks = {name: (lambda w: lambda mod, inp, out: shapes.__setitem__(w, tuple(out.shape[1:])))(w)
                 for name, (w, _) in self.linears.items()}
        with torch.no_grad(), hooks_of(self.search.model, hooks):
            self.search.model(self.search.ref_x[0, :1])
        return shapes

    def _hooks(self) -> dict:
        def conv(weight, bias):
            def hook(mod, inp, out):
                shape = (-1,) + (1,) * (out.dim() - 2)      # channels: dim 1 of (N, C, ...), here without N
                out = out * self.slice[weight].reshape(shape)
                if bias is not None:
                    out = out + (self.params[bias] * self.slice[bias]).reshape(shape)
                return out
            return hook

        def linear(weight, bias):
            def hook(mod, inp, out):
                x = inp[0]
                zi, zj, valid, probe = self.extra[weight]
                corr = -(x[..., zj] * (self.params[weight][zi, zj] * valid))      # (n, zeroed)
                out = out.scatter_add(-1, zi.expand(*corr.shape), corr)          # (index_add has no vmap rule)
                if bias is not None:
                    out = out + self.params[bias] * self.slice[bias]
                self.inputs[weight] = x
                return out + probe
            return hook

        return {**{name: conv(w, b) for name, (w, b) in self.convs.items()},
                **{name: linear(w, b) for name, (w, b) in self.linears.items()}}

    # -- one evaluation of G searches
    def evaluate(self, masks: dict, zeroed: list[dict], inputs: torch.Tensor, *, batched: bool = True,
                 shared: bool = False):
        """Logits (G, n, C) of ``inputs`` (G, n, ...) (``shared``: (n, ...) for every search) under the
        masks ``masks`` {name: (G, *item_shape) leaf} and each search's zeroed linear weights
        ``zeroed[g]`` {weight name: local indices}; returns (logits, probes, inputs of the linear
        layers) for :meth:`gradients`."""
        g = len(zeroed)
        n = inputs.shape[0] if shared else inputs.shape[1]
        extra = {}
        for w, name in self.lin_weights.items():
            cols = self.params[w].shape[1]
            width = max(1, max(len(z.get(w, ())) for z in zeroed))
            idx = torch.zeros(g, width, dtype=torch.long, device=self.search.device)
            valid = torch.zeros(g, width, dtype=self.search.dtype, device=self.search.device)
            for k, z in enumerate(zeroed):
                if z.get(w):
                    idx[k, :len(z[w])] = torch.tensor(z[w], dtype=torch.long)
                    valid[k, :len(z[w])] = 1
            probe = torch.zeros(g, n, *self.lin_shapes[w], dtype=self.search.dtype, device=self.search.device,
                                requires_grad=True)
            extra[w] = (idx // cols, idx % cols, valid, probe)

        def one(mask, ext, x):
            self.slice, self.extra, self.inputs = mask, ext, {}
            params = {k: self.fixed[k] if k in self.fixed else p * mask[k] for k, p in self.params.items()}
            logits = functional_call(self.search.model, (params, self.buffers), (x,))
            return logits, {w: self.inputs[w] for w in self.lin_weights}

        try:
            with hooks_of(self.search.model, self._hooks()):
                if self.vmap and batched:
                    try:
                        logits, xs = vmap(one, in_dims=(0, 0, None if shared else 0))(masks, extra, inputs)
                        return logits, {w: e[3] for w, e in extra.items()}, xs
                    except (RuntimeError, NotImplementedError, ValueError) as e:
                        self.vmap = False      # a layer that vmap cannot batch: one search at a time
                        self.fallback = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
                outs = [one({k: v[i] for k, v in masks.items()}, {w: tuple(t[i] for t in e) for w, e in extra.items()},
                            inputs if shared else inputs[i]) for i in range(g)]
        finally:
            self.slice = self.extra = self.inputs = None
        return (torch.stack([o[0] for o in outs]), {w: e[3] for w, e in extra.items()},
                {w: torch.stack([o[1][w] for o in outs]) for w in self.lin_weights})

    def gradients(self, leaves: dict, probes: dict, xs: dict, grads) -> dict:
        """{parameter name: (G, *item_shape) dO/dmask} from the ``grads`` iterator (in the order of
        :meth:`inputs_of`)."""
        out = {k: next(grads) for k in leaves}
        for w in probes:
            g, x = next(grads), xs[w].detach()
            g, x = g.reshape(len(g), -1, g.shape[-1]), x.reshape(len(x), -1, x.shape[-1])
            out[w] = self.params[w] * torch.bmm(g.transpose(1, 2), x)
        return out

    @staticmethod
    def inputs_of(leaves: dict, probes: dict) -> list:
        return list(leaves.values()) + list(probes.values())

    # -- the steps
    def start(self, s: dict) -> None:
        """Masks of a new search (per parameter, 1 = kept) and its zeroed linear weights."""
        s["mask"] = {sp.name: torch.ones(sp.item_shape, dtype=self.search.dtype, device=self.search.device)
                     for sp in self.spaces if sp.name in self.masked}
        s["lin"] = {}

    def check(self, check: list[dict]) -> np.ndarray:
        """Forward of every search's copies; has each flipped? (the forward is kept for :meth:`advance`)"""
        leaves = {k: torch.stack([s["mask"][k] for s in check]).requires_grad_(True) for k in self.masked}
        with torch.enable_grad():
            logits, probes, xs = self.evaluate(leaves, [s["lin"] for s in check], torch.stack([s["xt"] for s in check]))
            logits = logits.mean(1)
        batch = (logits, leaves, probes, xs)
        for i, s in enumerate(check):
            s["target"] = (batch, i)
        return (logits.argmax(1) != torch.stack([s["y"] for s in check])).cpu().numpy()

    def advance(self, slots: list[dict]) -> None:
        """One step of every search of ``slots``: the reference terms not memoised yet, one backward,
        and per search the official rule's item."""
        search = self.search
        targets = [s.pop("target") for s in slots]
        keys, misses, first, repeats, excluded = search._misses(slots)
        batches = list({id(b[1]): b for b, _ in targets}.values())
        whole = len(batches) == 1 and [i for _, i in targets] == list(range(len(batches[0][0])))
        ref = {k: torch.stack([targets[i][0][1][k][targets[i][1]] for i in first]).detach().requires_grad_(True)
               for k in self.masked} if misses else {}
        with torch.enable_grad():
            if misses:
                shared = len(set(repeats.tolist())) == 1        # one reference batch: its first layer runs once
                ref_logits, ref_probes, ref_xs = self.evaluate(
                    ref, [slots[i]["lin"] for i in first],
                    search.ref_x[int(repeats[0])] if shared else search.ref_x[repeats], shared=shared)
            target = batches[0][0] if whole else torch.stack([b[0][i] for b, i in targets])
            objective = search._objective(target, torch.stack([s["y"] for s in slots]),
                                          ref_logits if misses else None, repeats, excluded)
            parts = [self.inputs_of(b[1], b[2]) for b in batches] + ([self.inputs_of(ref, ref_probes)] if misses else [])
            grads = iter(torch.autograd.grad(objective, [t for part in parts for t in part]))
        with torch.no_grad():
            grad_t = {id(b[1]): self.gradients(b[1], b[2], b[3], grads) for b in batches}
            grad_r = self.gradients(ref, ref_probes, ref_xs, grads) if misses else {}
            names = [sp.name for sp in self.spaces]
            terms = search._remember(keys, misses, [{k: grad_r[k][m] for k in names} for m in range(len(misses))])
            zeroed = {}                    # per parameter: (search, item) of the zeroed items, scored 0
            for i, s in enumerate(slots):
                for j in s["units"]:
                    p = bisect.bisect_right(self.offsets, j) - 1
                    zeroed.setdefault(p, []).append((i, j - self.offsets[p]))
            scores = []
            for p, k in enumerate(names):      # target term + reference term
                g = (grad_t[id(batches[0][1])][k] if whole
                     else torch.stack([grad_t[id(b[1])][k][i] for b, i in targets]))
                score = g.add_(torch.stack([t[k] for t in terms])).flatten(1)
                if p in zeroed:
                    score[tuple(torch.tensor(zeroed[p], device=search.device).t())] = 0
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
            sp, j = self.spaces[p], int(scores[p][i].argmax())
            s["units"].append(sp.offset + j)
            if sp.name in s["mask"]:
                s["mask"][sp.name].view(-1)[j] = 0
            else:
                s["lin"].setdefault(sp.name, []).append(j)

    # -- the construction check
    def _agrees(self) -> bool:
        """Do the hooked modules give the logits and mask gradients of masking every weight (one
        search, random masks, two rows)?"""
        gen = torch.Generator().manual_seed(0)
        masks = {sp.name: (torch.rand(1, *sp.item_shape, generator=gen) > 0.2).to(self.search.device, self.search.dtype)
                 for sp in self.spaces}
        x = self.search.ref_x[0, None, :2]
        results, hooked = [], (self.convs, self.linears)
        for convs, linears in (hooked, ({}, {})):
            self._use(convs, linears)
            try:
                leaves = {k: masks[k].clone().requires_grad_(True) for k in self.masked}
                zeroed = [{w: (masks[w][0] == 0).flatten().nonzero()[:, 0].tolist() for w in self.lin_weights}]
                with torch.enable_grad():
                    logits, probes, xs = self.evaluate(leaves, zeroed, x, batched=False)
                    grads = torch.autograd.grad(logits.logsumexp(-1).sum(), self.inputs_of(leaves, probes))
                got = self.gradients(leaves, probes, xs, iter(grads))
                results.append((logits.detach(), torch.cat([(got[sp.name] * masks[sp.name]).flatten() for sp in self.spaces])))
            except (RuntimeError, ValueError, IndexError):
                return False
            finally:
                self._use(*hooked)
        (l1, g1), (l0, g0) = results
        tol = 1e-9 if self.search.dtype == torch.float64 else 1e-4
        return bool(torch.allclose(l0, l1, rtol=tol, atol=tol * float(l0.abs().max()))
                    and torch.allclose(g0, g1, rtol=tol, atol=tol * float(g0.abs().max())))
