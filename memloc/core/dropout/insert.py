"""Putting dropout layers into any model, switching their mode, binding example ids."""
from __future__ import annotations

import contextlib
import fnmatch

import torch
from torch import nn

from ..errors import MemlocError
from ..units import Hooks
from .layer import KINDS, MODES, ExampleTiedDropout, _UnitDropout, layer_seed

__all__ = ["insert_example_tied_dropout", "remove_example_tied_dropout", "dropout_layers", "set_mode",
           "auto_as_test", "example_ids", "require_dropout_layers"]

_ATTR = "_memloc_unit_dropout"   # instance attribute of a hooked module (outside _modules / state_dict)
_SINKS = "_memloc_sinks"         # instance attribute of a model given sinks by memloc.insert_sinks (its spec)


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
            raise MemlocError(f"no module of {type(model).__name__} matches {pat!r} (module names or "
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
        raise MemlocError(f"unknown dropout kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "example_tied" and p_mem is None:
        raise MemlocError("example-tied dropout needs p_mem")
    if isinstance(after, str):
        after = [a.strip() for a in after.split(",") if a.strip()]
    if not after:
        raise MemlocError("insert_example_tied_dropout needs at least one module name in after=")
    modules = dict(model.named_modules())
    names = _match(model, list(after))
    taken = [n for n in names if _ATTR in modules[n].__dict__]
    if taken:
        raise MemlocError(f"module {taken[0]!r} already has a dropout layer after it")
    out = {}
    for name in names:
        if kind == "example_tied":
            layer = ExampleTiedDropout(p_gen, p_mem, seed=layer_seed(seed, name), dim=dim)
        else:
            layer = KINDS[kind](p_gen, dim=dim)
        layer.where = name
        out[name] = layer
    for name, layer in out.items():
        object.__setattr__(modules[name], _ATTR, layer)   # not registered: invisible to state_dict
        layer.hooks = Hooks()                             # the layer keeps its handle
        layer.hooks.forward(modules[name], layer._hook)
    return out


def remove_example_tied_dropout(model: nn.Module) -> int:
    """Remove every layer inserted by :func:`insert_example_tied_dropout` (and the spec of
    :func:`memloc.insert_sinks`); returns how many."""
    model.__dict__.pop(_SINKS, None)
    n = 0
    for m in model.modules():
        layer = m.__dict__.pop(_ATTR, None)
        if layer is not None:
            layer.hooks.remove()
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


def require_dropout_layers(model) -> dict:
    """:func:`dropout_layers`, or one clear error when the model has none."""
    layers = dropout_layers(model)
    if not layers:
        raise MemlocError(f"{type(model).__name__} has no example-tied dropout layers "
                        "(insert them with insert_example_tied_dropout, or train with etd_after=...)")
    return layers


def set_mode(model: nn.Module, mode: str) -> dict[str, str]:
    """Set the mode of every dropout layer of ``model`` (one of :data:`MODES`); returns the old modes."""
    if mode not in MODES:
        raise MemlocError(f"unknown dropout mode {mode!r}; valid: {', '.join(MODES)}")
    old = {}
    for name, layer in require_dropout_layers(model).items():
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
    layers = list(require_dropout_layers(model).values())
    old = [layer._ids for layer in layers]
    ids = torch.as_tensor(ids)
    try:
        for layer in layers:
            layer._ids = ids
        yield
    finally:
        for layer, o in zip(layers, old):
            layer._ids = o


