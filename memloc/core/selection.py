"""Choosing what an analysis looks at: layers by name, checkpoints by epoch, and the model / data /
layers every layer-level analysis starts from (:func:`prepare`)."""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import MemlocError
from .inputs import as_data
from .run import Run, as_run, ranges
from .runtime import check_range, resolve_device, split_list
from .sequences import SequenceSet
from .tasks import example_input
from .units import Layer, Structure, trace

__all__ = ["select_layers", "parse_checkpoints", "copy_layer", "merged_layer", "Source", "resolve", "Prepared",
           "prepare", "layer_coords"]


def select_layers(structure: Structure, names: Iterable[str] | str | None = None) -> list[Layer]:
    """The layers called ``names`` (list or comma-separated string; None = all), in forward order."""
    if names is None:
        return list(structure.layers)
    wanted = split_list(names)
    valid = structure.layer_names
    unknown = [n for n in wanted if n not in valid]
    if unknown:
        raise MemlocError(f"unknown layer{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(valid)}")
    if not wanted:
        raise MemlocError(f"no layer named; valid: {', '.join(valid)}")
    return [l for l in structure.layers if l.name in wanted]


def parse_checkpoints(spec: str | int | Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """Epochs from ``"all"`` (or None), ``"final"``, ``"0,5,10"``, ranges ``"0-10"`` / ``"0-30:5"``, or
    as values: an epoch (``5``), a sequence of epochs (``[0, 5, 10]``, ``range(0, 31, 5)``).

    Every epoch must be in ``available`` (the run's checkpoints); returned sorted and unique.
    """
    available = sorted(int(e) for e in available)
    final = available[-1] if available else None
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        missing = sorted(set(range(final + 1)) - set(available)) if available else []
        if missing:
            warnings.warn(f"checkpoints of epochs {ranges(missing)} are missing; using the {len(available)} that exist")
        return available
    items = split_list(spec)        # a string, an epoch, a list / range / array / tensor of them
    out: set[int] = set()
    for item in items:
        item = str(item).strip()
        if item in ("final", "last") and final is not None:
            out.add(final)
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", item)
        if not m or (m.group(3) is not None and int(m.group(3)) < 1):
            raise MemlocError(f"bad checkpoint {item!r} in {spec!r}; use all, final, or comma-separated "
                              "epochs and ranges like 0,5,10 or 0-30:5")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if final is None or hi > final:     # before materialising a huge range
            raise MemlocError(f"no checkpoint for epoch {hi}; available: {ranges(available)}", argument="checkpoints")
        out.update(range(lo, hi + 1, int(m.group(3) or 1)))
    missing = sorted(out - set(available))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise MemlocError(f"no checkpoint for epoch{'s' if len(missing) > 1 else ''} {shown}; "
                          f"available: {ranges(available)}")
    if not out:
        raise MemlocError(f"no checkpoints selected by {spec!r}")
    return sorted(out)


@torch.no_grad()
def copy_layer(model: nn.Module, state: dict[str, torch.Tensor], layer: Layer) -> None:
    """Copy ``layer``'s parameters and buffers from ``state`` into ``model`` (in place: pass a copy)."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in layer.keys if k not in state or k not in own]
    if missing:
        raise MemlocError(f"state_dict has no tensor {missing[0]!r} of layer {layer.name!r}")
    for k in layer.keys:
        own[k].copy_(state[k])


def merged_layer(layers: Sequence[Layer], name: str = "<all>") -> Layer:
    """One pseudo-layer holding the tensors of all ``layers`` (e.g. to rewind everything at once)."""
    return Layer(name, "group", tuple(m for l in layers for m in l.modules),
                 tuple(k for l in layers for k in l.params), tuple(k for l in layers for k in l.buffers),
                 sum(l.numel for l in layers))


def layer_coords(layers: Sequence[Layer]) -> dict:
    """The ``layer`` coordinates of layer-level results: name, kind, parameter count."""
    return {"layer": [l.name for l in layers], "layer_kind": ("layer", [l.kind for l in layers]),
            "layer_numel": ("layer", np.array([l.numel for l in layers], dtype=np.int64))}


@dataclass
class Source:
    """What an analysis of a run or of a model runs on (see :func:`resolve`)."""

    run: Run | None            # None when a model was passed in
    model: nn.Module           # a private copy on ``device``, eval mode
    data: object               # memloc.core.data.Data on ``device``
    device: torch.device
    checkpoint: int | None     # the run's epoch of ``model`` (None for a model passed in)


def resolve(source, data=None, *, device="auto", checkpoint: int | None = None) -> Source:
    """The model (a copy: the caller's module keeps its mode, device and weights) and data of a
    :class:`Run` / run path (at ``checkpoint``, default final) or of an ``nn.Module`` and ``data``."""
    if checkpoint is not None:
        checkpoint = check_range("checkpoint", checkpoint, low=0, integer=True)
    dev = resolve_device(device)
    if isinstance(source, nn.Module):
        if data is None:
            raise MemlocError("data is required when a model is passed instead of a run", argument="data")
        return Source(None, copy.deepcopy(source).to(dev).eval(), _as_data(data).to(dev), dev, None)
    run = as_run(source)
    epoch = run.final_epoch if checkpoint is None else int(checkpoint)
    model = run.model(epoch, device=dev)
    return Source(run, model, run.data(dev) if data is None else _as_data(data).to(dev), dev, epoch)


def lm_source(source, data=None, *, checkpoint: int | None = None, device="auto", analysis: str = "this analysis"):
    """(model on ``device`` in eval mode, SequenceSet, checkpoint epoch or None) of a language-model run
    (a :class:`Run` or its path; ``checkpoint`` default final) or of a causal LM module (a copy: the
    caller's module is left as it is) with ``data``: :func:`resolve`'s twin for language models.
    ``analysis`` names the caller in the message refusing a classifier's run."""
    if checkpoint is not None:
        checkpoint = check_range("checkpoint", checkpoint, low=0, integer=True)
    dev = resolve_device(device)
    if isinstance(source, nn.Module):
        if not isinstance(data, SequenceSet):
            raise MemlocError("data must be a SequenceSet (memloc.tinymem, memloc.canaries) when source is a model, "
                              f"got {type(data).__name__}", argument="data")
        return copy.deepcopy(source).to(dev).eval(), data, None
    if isinstance(source, (str, os.PathLike)) and not os.path.isdir(source):
        raise MemlocError(f"source {str(source)!r} is not a run directory (give a language-model run or a causal "
                          "language model with its data)", argument="source")
    run = as_run(source)
    if not run.is_lm:
        raise MemlocError(f"run {str(run.path)!r} is not a language-model run (a classifier's); "
                          f"{analysis} needs a causal language model", argument="source")
    epoch = run.final_epoch if checkpoint is None else checkpoint
    return run.model(epoch, device=dev), (run.data() if data is None else data), epoch


def _as_data(data):
    """``data`` as :func:`memloc.core.inputs.as_data` makes it, a language model's SequenceSet as it is."""
    return data if isinstance(data, SequenceSet) else as_data(data)


@dataclass
class Prepared:
    """What a layer-level analysis starts from (see :func:`prepare`)."""

    run: Run | None            # None when a model was passed in
    model: nn.Module           # on ``device``, eval mode (the final checkpoint for a run)
    data: object               # memloc.core.data.Data (or a language model's SequenceSet) on ``device``
    device: torch.device
    structure: Structure
    layers: list[Layer]
    states: dict[int, object]  # epoch -> state_dict or a loader of it (see ``state``)

    def state(self, epoch: int) -> dict:
        s = self.states[epoch]
        return s() if callable(s) else s


def prepare(source, data=None, *, layers=None, checkpoints=None, device="auto") -> Prepared:
    """Model, data on ``device``, traced layers and selected checkpoints of ``source``.

    ``source``: a :class:`Run` or run path (``checkpoints``: see :func:`parse_checkpoints`, default
    all), or an ``nn.Module`` with ``data`` (``checkpoints``: a non-empty mapping
    ``{epoch: state_dict}``, or None / ``"all"`` for the module's own weights labelled epoch -1).
    """
    src = resolve(source, data, device=device)
    if src.run is None:
        if checkpoints is None or checkpoints == "all":
            states = {-1: {k: v.detach().clone() for k, v in src.model.state_dict().items()}}
        elif isinstance(checkpoints, Mapping) and checkpoints:
            states = {int(e): s for e, s in checkpoints.items()}
        else:
            raise MemlocError("checkpoints must be a non-empty mapping {epoch: state_dict} when a model is passed",
                              argument="checkpoints")
    else:
        chosen = parse_checkpoints("all" if checkpoints is None else checkpoints, src.run.epochs)
        states = {e: (lambda e=e: src.run.checkpoint(e)) for e in chosen}
    structure = trace(src.model, example_input(src.data))
    return Prepared(src.run, src.model, src.data, src.device, structure, select_layers(structure, layers), states)
