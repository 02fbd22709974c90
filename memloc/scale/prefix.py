"""Frozen prefixes computed once: when one layer changes (rewind, retrain), what runs before it does not.

Rewinding or retraining a layer leaves every module that runs before it unchanged, so the activations
flowing into the layer are the same on every pass. :class:`PrefixCache` computes them once for the
whole dataset (when they fit in a memory budget) and runs only the rest of the model on them.

For a layer, the *cut* is a module ``A`` (the layer's first module in forward order, or one of the
modules enclosing it) whose single tensor input is cached; the modules that finish before ``A``
starts are *skipped* (their ``forward`` replaced by the identity) in the cut pass, whose input is the
cached activation, so it flows unchanged to ``A``. That is exact only when nothing but ``A``'s input
flows onward from the skipped modules; a cut is therefore used only where it is proven on one
batch: with the layer's tensors perturbed, the cut pass must give exactly (``torch.equal``) the
plain pass's outputs and leave the cached input unchanged. Otherwise (a skip connection that
bypasses ``A``, a functional operation between modules, a skipped module owning or sharing the
layer's tensors, a hook that fails) the next enclosing module is tried, then the plain computation.
The first changed module running more than once per forward (shared weights) rules out a cut.

Cached inputs are computed in the evaluation batches (the same slices :func:`memloc.core.evaluate.accuracies`
takes), so evaluating from the cache repeats the plain computation bit for bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..core.data import ExampleSet
from ..core.evaluate import eval_mode
from ..core.selection import copy_layer
from ..core.units import Layer, hooks_of

__all__ = ["Cut", "Suffix", "PrefixCache", "skipping", "CACHE_MB"]

CACHE_MB = 512      # default memory budget of the cached activations, MiB
CHECK_ROWS = 64     # rows of the batch that proves a cut


@dataclass(frozen=True)
class Cut:
    """Run a model from ``module`` on: its input is cached, ``skip`` (modules finishing before it) is skipped."""

    module: str
    skip: tuple[str, ...]
    row_bytes: int      # bytes of one example's cached input


def _identity(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def skipping(modules: Sequence[nn.Module]):
    """Inside the block, each of ``modules`` returns its first input (its ``forward`` is restored after)."""
    saved = []
    try:
        for m in modules:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = _identity
        yield
    finally:
        for m, old in reversed(saved):
            if old is None:
                del m.forward
            else:
                m.forward = old


class Suffix(nn.Module):
    """``model`` from a cut on: ``forward(h)`` takes the cut module's input ``h`` (B, ...) -> logits."""

    def __init__(self, model: nn.Module, cut: Cut):
        super().__init__()
        self.model, self.cut = model, cut
        modules = dict(model.named_modules())
        self._skip = [modules[n] for n in cut.skip]

    def forward(self, h):
        with skipping(self._skip):
            return self.model(h)


def _within(name: str, outer: str) -> bool:
    return name == outer or outer == "" or name.startswith(outer + ".")


def _enclosing(name: str) -> list[str]:
    """``name`` and the names of the modules enclosing it, innermost first (the root excluded)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _stored(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` laid out like a slice of the cache: ``t``'s own strides (e.g. channels_last,
    which kernels follow) where examples are its outermost dimension, else row-major."""
    s = torch.empty_like(t)
    if s.ndim == 0 or s.stride(0) != s[0].numel():
        s = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return s.copy_(t)


def _rows(n: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (n, ...) tensor whose slices along dim 0 have the strides of ``like`` (a :func:`_stored`)."""
    return torch.empty_strided((n, *like.shape[1:]), like.stride(), dtype=like.dtype, device=like.device)


def _trace_calls(model: nn.Module, x: torch.Tensor, wanted: set[str]):
    """One eval pass: completion indices of every module's calls, and the shape and item size of the
    first input of the modules ``wanted`` that take one tensor."""
    calls: dict[str, list[int]] = {}
    inputs: dict[str, tuple[tuple[int, ...], int]] = {}
    counter = itertools.count()

    def make(name):
        def hook(mod, inp, out):
            calls.setdefault(name, []).append(next(counter))
            if name in wanted and name not in inputs and len(inp) == 1 and torch.is_tensor(inp[0]):
                inputs[name] = (tuple(inp[0].shape), inp[0].element_size())
        return hook

    names = [n for n, _ in model.named_modules() if n]
    with torch.no_grad(), eval_mode(model), hooks_of(model, {n: make(n) for n in names}, require_fired=False):
        model(x)
    return calls, inputs


def _capture(model: nn.Module, module: str, x: torch.Tensor) -> torch.Tensor | None:
    """The input of ``module`` in an eval pass on ``x``, laid out like the cache (None: not one call)."""
    got = []

    def grab(mod, inp, out):
        got.append(_stored(inp[0]))

    with torch.no_grad(), eval_mode(model), hooks_of(model, {module: grab}):
        model(x)
    return got[0] if len(got) == 1 else None


def _candidates(model: nn.Module, layer: Layer, calls, inputs, rows: int) -> list[Cut]:
    """Possible cuts for ``layer``, innermost first (not yet proven)."""
    called = [m for m in layer.modules if m in calls and m]
    if not called:
        return []
    first = min(called, key=lambda m: calls[m][0])
    if len(calls[first]) > 1:   # the first changed module runs more than once per forward
        return []
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    owned = {id(state[k]) for k in layer.keys if k in state}
    out = []
    for a in _enclosing(first):
        shape, itemsize = inputs.get(a, ((), 0))
        if len(calls.get(a, ())) != 1 or not shape or shape[0] != rows:
            continue
        done = calls[a][0]
        skip = [m for m, idx in calls.items() if idx[-1] < done and not _within(m, a) and not _within(a, m)]
        skip = [m for m in skip if not any(_within(m, o) for o in skip if o != m)]   # outermost only
        if not any(True for m in skip for _ in modules[m].parameters()):
            break   # nothing with weights to save (enclosing modules skip even less)
        if any(id(t) in owned for m in skip for t in (*modules[m].parameters(), *modules[m].buffers())):
            continue
        out.append(Cut(a, tuple(skip), math.prod(shape[1:]) * itemsize))
    return out


def _perturbed(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Floating tensors scaled elementwise by factors in [0.5, 1.5) (variances stay positive)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: t * (0.5 + torch.rand(t.shape, generator=gen, dtype=torch.float64)).to(t) if t.is_floating_point()
            else t for k, t in tensors.items()}


def _agrees(model: nn.Module, layer: Layer, cut: Cut, x: torch.Tensor) -> torch.Tensor | None:
    """The cut's input on ``x`` if the cut pass on it gives exactly the plain pass's outputs on ``x``
    with ``layer`` perturbed (and leaves it unchanged), else None."""
    try:
        h = _capture(model, cut.module, x)
    except RuntimeError:   # a hook that fails
        return None
    if h is None:
        return None
    state = model.state_dict(keep_vars=True)
    saved = {k: state[k].detach().clone() for k in layer.keys}
    copy_layer(model, _perturbed(saved), layer)
    try:
        with torch.no_grad(), eval_mode(model):
            want = model(x)
            h0 = h.clone()
            got = Suffix(model, cut)(h)
        return h if torch.equal(want, got) and torch.equal(h, h0) else None
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError):   # a hook or a shape that fails
        return None
    finally:
        copy_layer(model, saved, layer)


class PrefixCache:
    """Cached inputs of each layer's proven cut, for the whole dataset, within a memory budget.

    Parameters
    ----------
    model : the model whose layers change one at a time (used in place: the checks perturb a layer's
        tensors and put them back; every other tensor is only read).
    layers : the layers that will change.
    data : :class:`memloc.core.data.Data` on the model's device.
    batch_size : the evaluation batch size (the cache is computed in the same batches).
    budget_mb : memory for the cached activations (MiB); the deepest cuts are kept first, the layers
        whose cut does not fit are computed in full.
    extra_rows : rows cached besides train + test, for the budget (retraining's clean subset).
    enabled : False: cache nothing (:meth:`pick` returns the plain model and data).

    ``cuts[i]`` is the cut used for ``layers[i]`` (None: plain computation).
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer], data, *, batch_size: int = 1024,
                 budget_mb: float = CACHE_MB, extra_rows: int = 0, enabled: bool = True):
        self.model, self.data, self.batch_size = model, data, batch_size
        self.cuts: list[Cut | None] = [None] * len(layers)
        self._data: dict[str, object] = {}
        train = getattr(data, "train", None)
        if not enabled or not isinstance(train, ExampleSet) or not isinstance(data.test, ExampleSet) or not len(train):
            return
        x = train.x[:CHECK_ROWS]
        wanted = {a for l in layers for m in l.modules if m for a in _enclosing(m)}
        calls, inputs = _trace_calls(model, x, wanted)
        likes = {}   # cut module -> an empty (0, ...) tensor with the layout of its cache
        for i, layer in enumerate(layers):
            for c in _candidates(model, layer, calls, inputs, len(x)):
                h = _agrees(model, layer, c, x)
                if h is not None:
                    self.cuts[i] = c
                    likes.setdefault(c.module, _rows(0, h))
                    break
        # the budget: deepest cuts first (they save the most), each module's cache counted once
        rows = len(train) + len(data.test) + extra_rows
        chosen, used = set(), 0
        for c in sorted({c for c in self.cuts if c}, key=lambda c: -calls[c.module][0]):
            if used + c.row_bytes * rows <= budget_mb * 2 ** 20:
                chosen.add(c.module)
                used += c.row_bytes * rows
        self.cuts = [c if c and c.module in chosen else None for c in self.cuts]
        if chosen:
            self._fill({c.module: likes[c.module] for c in self.cuts if c})

    def _fill(self, example_inputs: dict[str, torch.Tensor]) -> None:
        """Cache the inputs of the cut modules (``{module: an empty tensor laid out like them}``),
        computed in the evaluation batches of train and test."""
        sets = {}
        for part in ("train", "test"):
            ex = getattr(self.data, part)
            bufs = {m: _rows(len(ex), h) for m, h in example_inputs.items()}
            pos = [0]

            def make(name, bufs=bufs, pos=pos):
                def hook(mod, inp, out):
                    bufs[name][pos[0]:pos[0] + len(inp[0])].copy_(inp[0])
                return hook

            with torch.no_grad(), eval_mode(self.model), hooks_of(self.model, {m: make(m) for m in bufs},
                                                                  require_fired=False):
                for xb, _, _ in ex.batches(self.batch_size):
                    self.model(xb)
                    pos[0] += len(xb)
            sets[part] = {m: ExampleSet(b, ex.y, ex.idx) for m, b in bufs.items()}
        for m in example_inputs:
            self._data[m] = dataclasses.replace(self.data, train=sets["train"][m], test=sets["test"][m])

    def pick(self, i: int) -> tuple[nn.Module, object]:
        """``(net, data)`` to evaluate ``layers[i]`` with: the :class:`Suffix` and the cached data,
        or the model and the data themselves."""
        cut = self.cuts[i]
        if cut is None:
            return self.model, self.data
        return Suffix(self.model, cut), self._data[cut.module]

    def same_rows(self, i: int, x: torch.Tensor, h: torch.Tensor) -> bool:
        """Is ``h`` (cached rows) exactly the cut input of ``layers[i]`` computed on ``x`` as one batch?

        Cached rows are computed in evaluation batches; a kernel may round differently for another
        batch size (CPU matrix products do for a few rows), so a training loop that gathers cached
        rows into its own batches checks its batch sizes with this first.
        """
        cut = self.cuts[i]
        if cut is None:
            return False
        got = _capture(self.model, cut.module, x)
        return got is not None and torch.equal(got, h)
