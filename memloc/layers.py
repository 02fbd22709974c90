"""Helpers shared by the layer-level analyses (gradients, rewind, retrain).

* :func:`open_run` / :func:`setup`: a run with checkpoints, its data on the device, its traced layers;
* :func:`select_layers` and :func:`parse_epochs`: ``--layers`` / ``--epochs`` values checked
  against what exists, with a :class:`~memloc.cli.UserError` that lists the valid choices;
* :func:`copy_layer`: copy one layer's tensors (parameters and its norm's buffers) from a
  state_dict into a model the caller owns;
* :func:`write_results`: the atomic results file with root attrs and ``/layers/{names,kinds,numel}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import cli
from .cli import UserError
from .h5 import atomic_h5, put, write_root_attrs
from .run import SUBSETS, Run, accuracies, load
from .units import Layer, Structure, trace

__all__ = ["open_run", "select_layers", "parse_epochs", "copy_layer", "merged_layer", "accuracy_row",
           "accuracy_datasets", "describe", "Setup", "setup", "add_layer_args", "table",
           "write_results"]


def open_run(path) -> Run:
    """:func:`memloc.run.load` that also insists on at least one checkpoint."""
    run = load(path)
    if not run.epochs:
        raise UserError(f"run {str(run.path)!r} has no checkpoints (expected "
                        f"{str(run.path / 'checkpoints' / 'epoch_0000.pt')!r} ...); train it first")
    return run


def select_layers(structure: Structure, names: Iterable[str] | str | None = None) -> list[Layer]:
    """The layers called ``names`` (comma-separated string or list; None = all), in forward order."""
    if names is None:
        return list(structure.layers)
    if isinstance(names, str):
        names = [names]
    wanted = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    valid = structure.layer_names
    unknown = [n for n in wanted if n not in valid]
    if unknown:
        raise UserError(f"unknown layer{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(valid)}")
    if not wanted:
        raise UserError(f"no layer named; valid: {', '.join(valid)}")
    return [l for l in structure.layers if l.name in wanted]


def parse_epochs(spec: str | Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """Epochs from ``"all"`` (or None), ``"final"``, ``"0,5,10"``, ranges ``"0-10"`` / ``"0-30:5"``.

    Every epoch must be in ``available`` (the run's checkpoints); returned sorted and unique.
    """
    available = sorted(int(e) for e in available)
    final = available[-1] if available else None
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return available
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        item = str(item).strip()
        if item in ("final", "last") and final is not None:
            out.add(final)
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", item)
        if not m or (m.group(3) is not None and int(m.group(3)) < 1):
            raise UserError(f"bad epoch {item!r} in {spec!r}; use all, final, or comma-separated "
                            "epochs and ranges like 0,5,10 or 0-30:5")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        out.update(range(lo, hi + 1, int(m.group(3) or 1)))
    missing = sorted(out - set(available))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise UserError(f"no checkpoint for epoch{'s' if len(missing) > 1 else ''} {shown}; "
                        f"available: {_ranges(available)}")
    if not out:
        raise UserError(f"no epochs selected by {spec!r}")
    return sorted(out)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    return f"{xs[0]}-{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


@torch.no_grad()
def copy_layer(model: nn.Module, state: dict[str, torch.Tensor], layer: Layer) -> None:
    """Copy ``layer``'s parameters and buffers from ``state`` into ``model`` (in place: pass a copy)."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in layer.keys if k not in state or k not in own]
    if missing:
        raise KeyError(f"state_dict has no tensor {missing[0]!r} of layer {layer.name!r}")
    for k in layer.keys:
        own[k].copy_(state[k])


def merged_layer(layers: Sequence[Layer], name: str = "<all>") -> Layer:
    """One pseudo-layer holding the tensors of all ``layers`` (e.g. to rewind everything at once)."""
    return Layer(name, "group", tuple(m for l in layers for m in l.modules),
                 tuple(k for l in layers for k in l.params), tuple(k for l in layers for k in l.buffers),
                 sum(l.numel for l in layers))


def accuracy_row(model: nn.Module, data, *, batch_size: int = 1024) -> np.ndarray:
    """:func:`memloc.run.accuracies` as a (4,) array ordered like :data:`memloc.run.SUBSETS`."""
    acc = accuracies(model, data, batch_size=batch_size)
    return np.array([acc[s] for s in SUBSETS], dtype=np.float64)


def accuracy_datasets(accuracy, dims: list[str], baseline) -> dict[str, tuple[object, list[str]]]:
    """``/subsets/names``, ``/accuracy`` (with ``dims``, last = subset) and ``/baseline`` (4,) datasets."""
    return {"subsets/names": (list(SUBSETS), ["subset"]), "accuracy": (accuracy, dims),
            "baseline": (baseline, ["subset"])}


def describe(row) -> str:
    """``clean 0.998, noisy 0.120, ...`` for a (4,) accuracy row."""
    return ", ".join(f"{k} {v:.3f}" for k, v in zip(SUBSETS, row))


@dataclass
class Setup:
    """What every layer analysis starts from (see :func:`setup`)."""

    run: Run
    device: torch.device
    data: object          # memloc.data.Data on ``device``
    structure: Structure
    layers: list[Layer]   # the selected layers
    epochs: list[int]     # the selected checkpoint epochs


def setup(run_dir, *, device="auto", layers=None, epochs=None) -> Setup:
    """Open ``run_dir`` (must have checkpoints), load its data on ``device``, trace its layers.

    ``layers`` / ``epochs``: ``--layers`` / ``--epochs`` values (see :func:`select_layers`,
    :func:`parse_epochs`; None = all).
    """
    run = open_run(run_dir)
    chosen = parse_epochs(epochs, run.epochs)
    dev = cli.resolve_device(device)
    data = run.data(dev)
    model = run.build_model().to(dev)
    structure = trace(model, data.train.x[:2])
    return Setup(run, dev, data, structure, select_layers(structure, layers), chosen)


def add_layer_args(p, *, epochs_help: str | None = None) -> None:
    """``--layers`` (and ``--epochs`` if ``epochs_help`` is given) and ``--device``."""
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="layers to analyse, space- or comma-separated (memloc.units.trace names, e.g. "
                        "fc1 head; an unknown name lists the valid ones); default: every layer")
    if epochs_help is not None:
        p.add_argument("--epochs", default="all",
                       help=epochs_help + ": all, final, or comma-separated checkpoint epochs and "
                                          "ranges, e.g. 0,5,10 or 0-30:5")
    cli.add_device_arg(p)


def table(layers: Sequence[Layer], columns: Sequence[str], values, fmt: str = "10.3f") -> str:
    """A plain-text table: one row per layer, one column per name in ``columns``; values (L, C)."""
    width = max([24] + [len(l.name) for l in layers])
    lines = [f"{'layer':<{width}} " + " ".join(f"{c:>10}" for c in columns)]
    lines += [f"{l.name:<{width}} " + " ".join(f"{v:{fmt}}" for v in row) for l, row in zip(layers, values)]
    return "\n".join(lines)


def write_results(s: Setup, name: str, config: dict, argv, datasets: dict[str, tuple[object, list[str]]]):
    """Write ``RUN/results/<name>.h5`` atomically; returns its path.

    Root attrs (schema ``memloc.<name>``; ``config`` plus the run, device and layer names),
    ``/layers/{names,kinds,numel}`` of ``s.layers`` and ``datasets``: ``{path in file: (array, dims)}``.
    """
    path = s.run.results_path(name)
    config = {"run": str(s.run.path), "device": str(s.device), "layers": [l.name for l in s.layers], **config}
    with atomic_h5(path) as f:
        write_root_attrs(f, f"memloc.{name}", config, argv)
        put(f, "layers/names", [l.name for l in s.layers], dims=["layer"])
        put(f, "layers/kinds", [l.kind for l in s.layers], dims=["layer"])
        put(f, "layers/numel", np.array([l.numel for l in s.layers], dtype=np.int64), dims=["layer"])
        for key, (array, dims) in datasets.items():
            put(f, key, array, dims=dims)
    return path
