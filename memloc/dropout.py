"""Example-tied dropout (Maini et al., ICML 2023, Section 5): direct memorisation into known units.

A fraction ``p_gen`` of the units of a layer (channels of NCHW outputs, features of 2-d / 3-d
token outputs) are **generalisation units**: always kept. The others are **memorisation units**:
each training example keeps its own fixed random subset of them, each unit with probability
``p_mem``. Dropping every memorisation unit after training (``drop`` mode) removes what the
network could only store in example-specific units -- mostly the memorised (mislabeled) examples.

Modes (:data:`MODES`, set with :func:`set_mode`):

* ``train`` -- per-example masks; kept units are **not** rescaled (as in the paper's code);
* ``test``  -- memorisation units scaled by ``p_mem`` (their expected mask value);
* ``drop``  -- memorisation units zeroed, generalisation units scaled by ``(p_gen + p_mem) / p_gen``;
* ``auto``  -- the default: ``train`` while the module is in training mode, else ``test``.

Generalisation units are the first ``floor(p_gen * C)`` units (as in the paper's code).
Masks are a counter-based hash (splitmix64 in int64 torch ops) of (seed, layer, example id,
unit index), computed on the activation's device at every forward: no per-dataset buffer,
memory independent of the dataset size, identical on every device by construction.

Example ids reach the layers without changing the model's forward signature::

    layers = insert_example_tied_dropout(model, after=["features.1", "classifier.1"],
                                         p_gen=0.4, p_mem=0.1)
    for x, y, idx in data.train.batches(128, shuffle=True):
        with example_ids(model, idx):
            loss = F.cross_entropy(model(x), y)
    set_mode(model, "drop")

``python -m memloc.dropout RUN`` evaluates a run trained with ``--etd-after`` in train, test and
drop mode and writes ``RUN/results/dropout.h5``: ``/accuracy`` (mode, subset) with
``/modes/names`` = train, test, drop and ``/subsets/names`` = :data:`memloc.run.SUBSETS` (the
train-mode test accuracy is NaN: test examples have no masks), ``/layers/{names, kind, units,
gen_units}``. Models with BatchNorm collected its running statistics under the training masks;
``--recalibrate-bn`` (:func:`recalibrate_norms`) re-estimates them in test and drop mode first
(on a width-16 ResNet-9 this turns a 4-8 point test-accuracy loss in drop mode into +-0.2).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cli
from .cli import UserError
from .h5 import atomic_h5, put, write_root_attrs

__all__ = ["ExampleTiedDropout", "StandardDropout", "FixedSparseDropout", "KINDS", "MODES",
           "insert_example_tied_dropout", "remove_example_tied_dropout", "dropout_layers",
           "set_mode", "auto_as_test", "example_ids", "example_masks", "evaluate_modes", "recalibrate_norms", "parse_args", "main"]

MODES = ("auto", "train", "test", "drop")
_ATTR = "_memloc_unit_dropout"   # instance attribute of a hooked module (outside _modules / state_dict)

# ---------------------------------------------------------------------- counter-based hash
_U64 = 1 << 64


def _s64(u: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``u``."""
    u %= _U64
    return u - _U64 if u >= 1 << 63 else u


_GOLDEN, _M1, _M2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic = arithmetic mod 2**64)."""
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def _splitmix_int(u: int) -> int:
    """Pure-Python splitmix64 (unsigned ints), used for seeds."""
    u = (u + 0x9E3779B97F4A7C15) % _U64
    u = ((u ^ (u >> 30)) * 0xBF58476D1CE4E5B9) % _U64
    u = ((u ^ (u >> 27)) * 0x94D049BB133111EB) % _U64
    return u ^ (u >> 31)


def example_masks(ids: torch.Tensor, units: torch.Tensor, *, p_mem: float, seed: int) -> torch.Tensor:
    """Keep masks of example ``ids`` (B,) for unit indices ``units`` (M,): (B, M) bool.

    Bit ``[b, m]`` is ``splitmix(splitmix(ids[b] ^ splitmix(seed)) + units[m]) >> 11 < p_mem * 2**53``
    (logical shift on the 64 bits): true with probability ``p_mem``, a pure function of (seed,
    id, unit) computed on ``ids``' device.
    """
    key = _s64(_splitmix_int(int(seed) % _U64))
    h = _splitmix(_splitmix(ids.long() ^ key)[:, None] + units.long()[None, :].to(ids.device))
    return _lsr(h, 11) < round(float(p_mem) * 2 ** 53)


# ---------------------------------------------------------------------- modules
class _UnitDropout(nn.Module):
    """Common machinery: generalisation units, mode dispatch, unit axis, hooking."""

    kind = "?"

    def __init__(self, p_gen: float, *, dim: int | None = None):
        super().__init__()
        if not 0 < float(p_gen) <= 1:
            raise UserError(f"p_gen must be in (0, 1], got {p_gen}")
        self.p_gen = float(p_gen)
        self.dim = dim
        self.mode = "auto"
        self.where = None          # name of the module it follows (set by insert_example_tied_dropout)
        self.units_seen = None     # number of units of the last activation (for reports)
        self._ids = None

    def n_gen(self, n_units: int) -> int:
        """Number of generalisation units among ``n_units``: ``floor(p_gen * n_units)``."""
        return int(math.floor(self.p_gen * n_units + 1e-9))

    def effective_mode(self) -> str:
        return ("train" if self.training else "test") if self.mode == "auto" else self.mode

    def _unit_dim(self, x: torch.Tensor) -> int:
        if self.dim is not None:
            return self.dim % x.ndim
        if x.ndim < 2:
            raise ValueError(f"{self._label()}: expected a (B, C, ...) or (B, ..., C) activation, got shape {tuple(x.shape)}")
        return 1 if x.ndim >= 4 else x.ndim - 1

    def _scale(self, x: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
        """``x * scale`` with ``scale`` (B or 1, C) broadcast along the unit axis ``dim``."""
        shape = [1] * x.ndim
        shape[0], shape[dim] = scale.shape
        return x * scale.to(x.dtype).reshape(shape)

    def _gen_scale(self, n_units: int, gen: float, mem: float, device) -> torch.Tensor:
        s = torch.full((1, n_units), float(mem), device=device)
        s[:, :self.n_gen(n_units)] = gen
        return s

    def _label(self) -> str:
        return f"{type(self).__name__}" + (f" after {self.where!r}" if self.where else "")

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, ...) for ndim >= 4, else (B, [T,] C); ``ids`` (B,) example ids (train mode)."""
        if not torch.is_tensor(x):
            raise TypeError(f"{self._label()}: the output to drop units of is a {type(x).__name__}, not a tensor")
        dim = self._unit_dim(x)
        self.units_seen = int(x.shape[dim])
        mode = self.effective_mode()
        if mode == "train":
            return self._train(x, dim, self._ids if ids is None else ids)
        if mode == "test":
            return self._test(x, dim)
        return self._drop(x, dim)

    def _hook(self, module, inputs, output):
        self.train(module.training)
        return self(output)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config().items())

    def _config(self) -> dict:
        return {"p_gen": self.p_gen, "mode": self.mode, **({"after": self.where} if self.where else {})}


class ExampleTiedDropout(_UnitDropout):
    """Example-tied dropout over the units (channels / features) of an activation.

    Parameters
    ----------
    p_gen : float in (0, 1]
        Fraction of units always kept (the first ``floor(p_gen * C)``: generalisation units).
    p_mem : float in [0, 1]
        Probability that a memorisation unit is kept for a given example.
    seed : int
        Seed of the masks; the mask of (example id, unit) is a pure function of (seed, id, unit).
    dim : int, optional
        Unit axis; default 1 for activations with >= 4 dims (NCHW), else the last.

    Train mode needs the example ids of the batch: ``forward(x, ids)``, or for a model with
    inserted layers ``with example_ids(model, idx): model(x)``.
    """

    kind = "example_tied"

    def __init__(self, p_gen: float, p_mem: float, *, seed: int = 0, dim: int | None = None):
        super().__init__(p_gen, dim=dim)
        if not 0 <= float(p_mem) <= 1:
            raise UserError(f"p_mem must be in [0, 1], got {p_mem}")
        self.p_mem = float(p_mem)
        self.seed = int(seed)

    def masks(self, ids: torch.Tensor, n_units: int) -> torch.Tensor:
        """(B, n_units) float keep masks (1 = kept) of example ``ids`` (B,), on ``ids``' device."""
        n_gen = self.n_gen(n_units)
        mem = example_masks(ids, torch.arange(n_gen, n_units, device=ids.device), p_mem=self.p_mem, seed=self.seed)
        return torch.cat([torch.ones(len(ids), n_gen, dtype=torch.bool, device=ids.device), mem], 1).float()

    def _train(self, x, dim, ids):
        if ids is None:
            raise UserError(f"{self._label()} is in train mode but no example ids are bound: wrap the "
                            "forward in `with memloc.dropout.example_ids(model, idx):` (or pass ids=), "
                            "or switch to eval / set_mode(model, 'test' or 'drop')")
        ids = torch.as_tensor(ids, device=x.device)
        if ids.ndim != 1 or ids.shape[0] != x.shape[0] or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{self._label()}: example ids must be an integer vector of the batch size "
                             f"{x.shape[0]}, got {tuple(ids.shape)} {ids.dtype}")
        return self._scale(x, self.masks(ids, x.shape[dim]), dim)

    def _test(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], 1.0, self.p_mem, x.device), dim)

    def _drop(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], (self.p_gen + self.p_mem) / self.p_gen, 0.0, x.device), dim)

    def _config(self) -> dict:
        return {"p_gen": self.p_gen, "p_mem": self.p_mem, "seed": self.seed, **super()._config()}


class StandardDropout(_UnitDropout):
    """Baseline: ordinary (element-wise, inverted) dropout with ``p = 1 - p_gen``.

    ``test``: identity. ``drop``: the same units as example-tied dropout's memorisation units
    (all but the first ``floor(p_gen * C)``) are zeroed and the rest scaled by ``1 / p_gen``.
    """

    kind = "standard"

    def _train(self, x, dim, ids):
        return F.dropout(x, p=1 - self.p_gen, training=True)

    def _test(self, x, dim):
        return x

    def _drop(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], 1 / self.p_gen, 0.0, x.device), dim)


class FixedSparseDropout(_UnitDropout):
    """Baseline: a fixed sparse mask keeping only the first ``floor(p_gen * C)`` units, in every mode."""

    kind = "fixed"

    def _train(self, x, dim, ids):
        return self._drop(x, dim)

    def _test(self, x, dim):
        return self._drop(x, dim)

    def _drop(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], 1.0, 0.0, x.device), dim)


KINDS = {"example_tied": ExampleTiedDropout, "standard": StandardDropout, "fixed": FixedSparseDropout}


# ---------------------------------------------------------------------- inserting into any model
def _layer_seed(seed: int, name: str) -> int:
    """Independent mask seeds per layer, derived from the run seed and the module name."""
    return _splitmix_int((int(seed) % _U64) ^ (zlib.crc32(name.encode()) << 32)) >> 1


def _glob(name: str, pattern: str) -> bool:
    """Path-like glob on dotted names: one fnmatch per component (``*`` never crosses a dot)."""
    a, b = name.split("."), pattern.split(".")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(x, y) for x, y in zip(a, b))


def _match(model: nn.Module, patterns) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if _glob(n, pat)]
        if not hits:
            shown = ", ".join(names[:40]) + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")
            raise UserError(f"no module of {type(model).__name__} matches {pat!r} (module names or "
                            f"patterns such as 'layer*' or 'blocks.*.mlp'); candidates: {shown}")
        out += [h for h in hits if h not in out]
    return out


def insert_example_tied_dropout(model: nn.Module, after, *, p_gen: float, p_mem: float | None = None,
                                seed: int = 0, kind: str = "example_tied",
                                dim: int | None = None) -> dict[str, _UnitDropout]:
    """Apply (example-tied) dropout to the outputs of the modules named in ``after``.

    Each matched module gets a forward hook that passes its output through a fresh dropout
    module. The dropout modules have no parameters or buffers and are kept outside the module
    tree (``state_dict`` and parameter names are unchanged; ``copy.deepcopy`` copies them).

    Parameters
    ----------
    model : nn.Module
    after : str or list of str
        Module names (``dict(model.named_modules())`` keys) or glob patterns matched one
        dotted component at a time (``"layer*"`` matches ``layer1`` but not ``layer1.0``;
        ``"blocks.*.mlp.act"``); a string may be comma-separated.
    p_gen, p_mem, seed :
        See :class:`ExampleTiedDropout` (``p_mem`` is required there, unused by the baselines);
        each layer derives its own seed from ``seed`` and its name.
    kind : {"example_tied", "standard", "fixed"}
        :class:`ExampleTiedDropout` or the baselines :class:`StandardDropout` (p = 1 - p_gen)
        and :class:`FixedSparseDropout`.
    dim : int, optional
        Unit axis (default: 1 for >= 4-d outputs, else the last).

    Returns
    -------
    dict
        ``{module name: dropout module}`` in model order.
    """
    if kind not in KINDS:
        raise UserError(f"unknown dropout kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "example_tied" and p_mem is None:
        raise UserError("example-tied dropout needs p_mem")
    if isinstance(after, str):
        after = [a.strip() for a in after.split(",") if a.strip()]
    if not after:
        raise UserError("insert_example_tied_dropout needs at least one module name in after=")
    modules = dict(model.named_modules())
    names = _match(model, list(after))
    taken = [n for n in names if _ATTR in modules[n].__dict__]
    if taken:
        raise UserError(f"module {taken[0]!r} already has a dropout layer after it")
    out = {}
    for name in names:
        if kind == "example_tied":
            layer = ExampleTiedDropout(p_gen, p_mem, seed=_layer_seed(seed, name), dim=dim)
        else:
            layer = KINDS[kind](p_gen, dim=dim)
        layer.where = name
        out[name] = layer
    for name, layer in out.items():
        object.__setattr__(modules[name], _ATTR, layer)   # not registered: invisible to state_dict
        modules[name].register_forward_hook(layer._hook)
    return out


def remove_example_tied_dropout(model: nn.Module) -> int:
    """Remove every layer inserted by :func:`insert_example_tied_dropout`; returns how many."""
    n = 0
    for m in model.modules():
        layer = m.__dict__.pop(_ATTR, None)
        if layer is not None:
            for key, hook in list(m._forward_hooks.items()):
                if getattr(hook, "__self__", None) is layer:
                    del m._forward_hooks[key]
            n += 1
    return n


def dropout_layers(model: nn.Module) -> dict[str, _UnitDropout]:
    """``{name: layer}`` of every (example-tied / baseline) dropout layer of ``model``.

    Inserted layers are named after the module they follow; layers that are submodules are
    named by their own module name.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _UnitDropout):
            out[name] = m
        if _ATTR in m.__dict__:
            out[name] = m.__dict__[_ATTR]
    return out


def _layers_or_error(model):
    layers = dropout_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no example-tied dropout layers "
                        "(insert them with insert_example_tied_dropout or train with --etd-after)")
    return layers


def set_mode(model: nn.Module, mode: str) -> dict[str, str]:
    """Set the mode of every dropout layer of ``model`` (one of :data:`MODES`); returns the old modes."""
    if mode not in MODES:
        raise UserError(f"unknown dropout mode {mode!r}; valid: {', '.join(MODES)}")
    old = {}
    for name, layer in _layers_or_error(model).items():
        old[name], layer.mode = layer.mode, mode
    return old


@contextlib.contextmanager
def auto_as_test(model: nn.Module):
    """Inside the block, dropout layers of ``model`` in ``auto`` mode act as in ``test`` mode.

    For passes that put only the norms in train mode (batch statistics): an ``auto`` layer follows
    the train flag of the module it is hooked on, so one hooked on a norm would switch to
    ``train`` mode and ask for example ids.
    """
    layers = [layer for layer in dropout_layers(model).values() if layer.mode == "auto"]
    try:
        for layer in layers:
            layer.mode = "test"
        yield
    finally:
        for layer in layers:
            layer.mode = "auto"


@contextlib.contextmanager
def example_ids(model: nn.Module, ids):
    """Bind the example ids ``ids`` (B,) of the next forward passes to every dropout layer of ``model``."""
    layers = list(_layers_or_error(model).values())
    old = [layer._ids for layer in layers]
    ids = torch.as_tensor(ids)
    try:
        for layer in layers:
            layer._ids = ids
        yield
    finally:
        for layer, o in zip(layers, old):
            layer._ids = o


# ---------------------------------------------------------------------- evaluation and CLI
EVAL_MODES = ("train", "test", "drop")


class _WithIds:
    """An ExampleSet whose batches are evaluated with their example ids bound to ``model``."""

    def __init__(self, examples, model):
        self.examples, self.model = examples, model

    def batches(self, batch_size, **kw):
        for x, y, idx in self.examples.batches(batch_size, **kw):
            with example_ids(self.model, idx):
                yield x, y, idx   # the consumer's forward runs while the ids are bound


def recalibrate_norms(model: nn.Module, examples, *, batch_size: int = 1024) -> int:
    """Re-estimate every BatchNorm's running statistics from ``examples``' inputs, in place.

    The statistics of a model trained with dropout layers were collected under the training
    masks; in ``test`` or ``drop`` mode the activations reaching each norm are distributed
    differently. This resets the running mean / variance of every batch norm and replaces them
    by the average over the batches of ``examples`` (forward passes only, labels unused, every
    other module in eval mode and the dropout layers in their current mode, ``auto`` acting as
    ``test``: :func:`auto_as_test`). Returns the number
    of norms recalibrated (0: nothing to do).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None          # cumulative average over the batches
            m.train()
        with torch.no_grad(), auto_as_test(model):
            for x, _, _ in examples.batches(batch_size):
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def evaluate_modes(model: nn.Module, data, *, modes=EVAL_MODES, batch_size: int = 1024,
                   recalibrate_bn: bool = False) -> np.ndarray:
    """Accuracies (len(modes), len(SUBSETS)) of ``model`` (eval mode) with its dropout layers in each mode.

    Subsets are :data:`memloc.run.SUBSETS` (clean, noisy w.r.t. given labels, noisy w.r.t. true
    labels, test). In ``train`` mode every training example is seen through its own training
    mask (what the network memorised); the test column is NaN there (test examples have no
    masks). With ``recalibrate_bn`` the ``test`` and ``drop`` modes are evaluated on a copy whose
    BatchNorm statistics were re-estimated in that mode from the training inputs
    (:func:`recalibrate_norms`; ``train`` mode keeps the statistics training collected). The
    layers' modes (and ``model``) are left as they were.
    """
    from .run import SUBSETS, accuracies
    layers = _layers_or_error(model)
    old = {name: layer.mode for name, layer in layers.items()}
    unknown = [mode for mode in modes if mode not in EVAL_MODES]
    if unknown:
        raise UserError(f"unknown evaluation mode {unknown[0]!r}; valid: {', '.join(EVAL_MODES)}")
    out = np.full((len(modes), len(SUBSETS)), np.nan)
    try:
        for i, mode in enumerate(modes):
            set_mode(model, mode)
            if mode == "train":
                no_test = data.test.subset(np.zeros(len(data.test), bool))
                acc = accuracies(model, dataclasses.replace(data, train=_WithIds(data.train, model), test=no_test),
                                 batch_size=batch_size)
            elif recalibrate_bn:
                work = copy.deepcopy(model)
                recalibrate_norms(work, data.train, batch_size=batch_size)
                acc = accuracies(work, data, batch_size=batch_size)
            else:
                acc = accuracies(model, data, batch_size=batch_size)
            out[i] = [acc[s] for s in SUBSETS]
    finally:
        for name, m in old.items():
            layers[name].mode = m
    return out


def parse_args(argv=None):
    p = cli.parser("memloc.dropout", "Evaluate a run trained with example-tied dropout (--etd-after) in "
                   "train mode (each training example through its own mask: what was memorised), test "
                   "mode (memorisation units scaled by p_mem) and drop mode (memorisation units zeroed, "
                   "generalisation units rescaled): accuracy on clean training examples, noisy ones "
                   "(given and true labels) and the test set. Writes RUN/results/dropout.h5 "
                   "(/accuracy [mode, subset], /modes/names, /subsets/names, /layers/...).")
    p.add_argument("run", help="run directory (trained with --etd-after)")
    p.add_argument("--epoch", type=int, default=None, help="checkpoint to evaluate (default: final)")
    p.add_argument("--batch-size", type=int, default=1024, help="evaluation batch size")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="before evaluating test and drop mode, re-estimate the BatchNorm running statistics "
                        "in that mode from the training inputs (training collected them under the "
                        "per-example masks; recommended for models with BatchNorm, e.g. resnet9)")
    cli.add_device_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors("memloc.dropout"):
        from .run import SUBSETS, load
        cli.check_positive(args, "batch_size")
        device = cli.resolve_device(args.device)
        run = load(args.run)
        model = run.model(args.epoch, device=device)
        layers = dropout_layers(model)
        if not layers:
            raise UserError(f"run {args.run!r} has no example-tied dropout layers (train it with --etd-after)")
        epoch = run.final_epoch if args.epoch is None else args.epoch
        acc = evaluate_modes(model, run.data(device), batch_size=args.batch_size,
                             recalibrate_bn=args.recalibrate_bn)
        spec = run.info.get("model", {}).get("etd", {})
        config = {"epoch": epoch, "batch_size": args.batch_size, "recalibrate_bn": args.recalibrate_bn,
                  "etd": spec}
        with atomic_h5(run.results_path("dropout")) as f:
            write_root_attrs(f, "memloc.dropout", config, ["memloc.dropout", *(argv or [])])
            put(f, "accuracy", acc, dims=["mode", "subset"])
            put(f, "modes/names", list(EVAL_MODES), dims=["mode"])
            put(f, "subsets/names", list(SUBSETS), dims=["subset"])
            put(f, "layers/names", list(layers), dims=["layer"])
            put(f, "layers/kind", [l.kind for l in layers.values()], dims=["layer"])
            put(f, "layers/units", [l.units_seen or 0 for l in layers.values()], dims=["layer"])
            put(f, "layers/gen_units", [l.n_gen(l.units_seen or 0) for l in layers.values()], dims=["layer"])
        print(f"{run.path} (epoch {epoch}; {len(layers)} dropout layers: {', '.join(layers)})")
        print(format_table(acc, EVAL_MODES))
        print(f"wrote {run.results_path('dropout')}")
    return acc


def format_table(acc: np.ndarray, modes) -> str:
    """Plain-text table of accuracies (mode, subset) in percent."""
    from .run import SUBSETS
    lines = [f"{'mode':<6}" + "".join(f"{s:>12}" for s in SUBSETS)]
    for mode, row in zip(modes, acc):
        lines.append(f"{mode:<6}" + "".join(f"{'-':>12}" if np.isnan(v) else f"{100 * v:>11.2f}%" for v in row))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
