"""Layer rewinding: put one layer of the final model back to an earlier checkpoint.

``memloc.rewind(run_or_model, data=None, *, checkpoints="all", layers=None)`` (command:
``python -m memloc.rewind RUN``).

For every rewind epoch ``e`` and every layer, the layer's parameters *and* its norm's buffers
(running statistics) are copied from checkpoint ``e`` into a copy of the final model, which is
then evaluated (eval mode) on the subsets of :data:`memloc.core.evaluate.SUBSETS`: clean training
examples, noisy training examples w.r.t. their given labels (the fraction still memorised) and
w.r.t. their true labels, and the test set. If memorisation lived in one layer, rewinding that
layer would drop the noisy accuracy while keeping the clean and test accuracy.

On a language model's run the subsets are :data:`memloc.core.schemas.LM_SUBSETS`: the share of
clean training sequences and of memorisation targets (the noisy ones) still exactly memorised
(the argmax right at every suffix position), the suffix token accuracy of the clean and the
held-out sequences, and the share of held-out suffixes reproduced (:mod:`memloc.core.tasks`).

Returns the ``"rewind"`` result: ``accuracy`` (checkpoint, layer, subset) and ``baseline``
(subset), the unrewound final model's accuracies.

Everything that runs before a rewound layer is the final model's at every checkpoint: with
``prefix_cache`` (default) its output is computed once for the whole dataset and reused (see
:mod:`memloc.scale.prefix`; the same accuracies, bit for bit; classifiers only).
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
import xarray as xr

from ..scale.distributed import shard, world
from ..core.errors import MemlocError
from ..scale.parts import Parts, parts_folder
from ..core.precision import apply_channels_last, autocast, check_precision
from ..scale.prefix import CACHE_MB, PrefixCache
from ..core.results import Result
from ..core.runtime import check_flag, check_range, progress
from ..core.selection import copy_layer, layer_coords, prepare
from ..core.tasks import task_of
from ..core.units import Layer
from ..core.options import add_checkpoints, add_eval_batch_size, add_layers, add_precision, describe, layer_table
from ..core.figures import groups, figure, coord_names, heatmaps, accuracy_rows
from ..core.schemas import Schema, Var, layer_vars, SUBSET_VAR
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored

__all__ = ["rewind", "rewind_layers"]


def rewind_layers(model: nn.Module, states: Iterable[dict[str, torch.Tensor]], layers: Sequence[Layer], data, *,
                  batch_size: int = 1024, prefix_cache: bool = True,
                  prefix_cache_mb: float = CACHE_MB) -> tuple[np.ndarray, np.ndarray]:
    """Accuracies of ``model`` with one layer at a time replaced by its tensors in each of ``states``.

    Parameters
    ----------
    model : the final model (not modified; a copy is edited).
    states : R state_dicts (e.g. earlier checkpoints), consumed one at a time.
    layers : the L layers to rewind (a :func:`memloc.core.selection.merged_layer` rewinds several at once).
    data : :class:`memloc.core.data.Data` on the model's device (or a language model's
        :class:`memloc.core.sequences.SequenceSet`).
    prefix_cache : compute what runs before each layer once (within ``prefix_cache_mb`` MiB of
        activations; :class:`memloc.scale.prefix.PrefixCache`) instead of on every pass. Same results.

    Returns
    -------
    accuracy : (R, L, S) array over the S subsets of the data (:data:`memloc.core.evaluate.SUBSETS`,
        a language model's :data:`memloc.core.schemas.LM_SUBSETS`).
    baseline : (S,) accuracies of ``model`` itself.
    """
    rewinder = _Rewinder(model, layers, data, batch_size=batch_size, prefix_cache=prefix_cache,
                         prefix_cache_mb=prefix_cache_mb)
    rows = [[rewinder.accuracy(state, i) for i in range(len(layers))] for state in states]
    subsets = len(rewinder.task.subsets)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(layers), subsets), rewinder.baseline


class _Rewinder:
    """A copy of ``model`` and its prefix cache; :meth:`accuracy` rewinds one layer to a state."""

    def __init__(self, model, layers, data, *, batch_size, prefix_cache, prefix_cache_mb):
        self.work = copy.deepcopy(model).eval()
        self.final = {k: v.detach().clone() for k, v in self.work.state_dict().items()}
        self.layers, self.batch_size, self.task = layers, batch_size, task_of(data)
        self.baseline = self.task.subset_row(self.work, batch_size=batch_size)
        self.cache = PrefixCache(self.work, layers, data, batch_size=batch_size, budget_mb=prefix_cache_mb,
                                 enabled=prefix_cache and self.task.prefix_cache)

    def accuracy(self, state: dict[str, torch.Tensor], i: int) -> np.ndarray:
        """Accuracies with ``layers[i]`` of the final model replaced by its tensors in ``state``."""
        layer = self.layers[i]
        copy_layer(self.work, state, layer)
        net, cached = self.cache.pick(i)
        row = self.task.subset_row(net, cached, batch_size=self.batch_size)
        copy_layer(self.work, self.final, layer)
        return np.asarray(row, dtype=np.float64)


@renamed(resume_dir="resume")
@stored('rewind')
def rewind(source, data=None, *, checkpoints="all", layers=None, eval_batch_size: int = 1024,
           device="auto", prefix_cache: bool = True, prefix_cache_mb: float = CACHE_MB, resume=None,
           overwrite: bool = False, precision: str = "fp32") -> Result | None:
    """Rewind every layer (or those named in ``layers``) of the final model to each checkpoint.

    ``source``: a :class:`memloc.Run` / run path, or an ``nn.Module`` with ``data`` and
    ``checkpoints={epoch: state_dict}``. ``prefix_cache=False`` recomputes the whole model on
    every pass (see :func:`rewind_layers`). Returns the ``"rewind"`` result: ``accuracy``
    (checkpoint, layer, subset) and ``baseline`` (subset).

    ``resume``: folder of resumable part files (:class:`memloc.scale.parts.Parts`; ``"auto"``:
    ``RUN/results/rewind.partial`` for a run, as ``memloc rewind`` uses; None, the default: nothing
    saved in one process): each checkpoint's finished cells are saved there, and a rerun with the
    same settings takes them instead of recomputing them (``overwrite`` discards parts made with
    other settings); they are deleted when the result is saved (:meth:`memloc.Result.save`). Under
    torchrun (:mod:`memloc.scale.distributed`) the (checkpoint, layer) cells are split across the
    processes (None then means ``"auto"``) and rank 0 returns the merged result, the other ranks
    None.

    ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: every forward pass (the prefix
    cache included) under autocast (:mod:`memloc.core.precision`); recorded in the config.
    """
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    prefix_cache_mb = check_range("prefix_cache_mb", prefix_cache_mb, low=0)
    prefix_cache = check_flag("prefix_cache", prefix_cache)
    check_precision(precision)
    if isinstance(source, nn.Module) and not isinstance(checkpoints, dict):
        raise MemlocError("checkpoints must be a mapping {epoch: state_dict} to rewind to when a model is passed",
                          argument="checkpoints")
    p = prepare(source, data, device=device, layers=layers, checkpoints=checkpoints)
    epochs = list(p.states)
    check_precision(precision, p.device)
    apply_channels_last(p.model, precision, p.device)
    config = {"checkpoints": epochs, "layers": [l.name for l in p.layers], "eval_batch_size": eval_batch_size,
              "final_epoch": p.run.final_epoch if p.run is not None else None, "device": str(p.device),
              "precision": precision}
    parts = Parts(parts_folder(resume, p.run, "rewind"), {**config, "device": p.device.type}, what="rewind",
                  overwrite=overwrite)
    try:
        todo = [(e, i) for e in epochs for i in range(len(p.layers)) if (e, i) not in parts.done]
        mine = shard(todo)
        with autocast(precision, p.device):
            rewinder = _Rewinder(p.model, p.layers, p.data, batch_size=eval_batch_size, prefix_cache=prefix_cache,
                                 prefix_cache_mb=prefix_cache_mb)
            for e in progress([e for e in epochs if any(c[0] == e for c in mine)], desc="rewind",
                              unit="checkpoint"):
                state = p.state(e)
                parts.add({(e, i): rewinder.accuracy(state, i) for e_, i in mine if e_ == e})
        parts.gather()
    finally:
        parts.release()
    if world()[0] > 0:
        return None             # rank 0 merges the parts and returns the result
    acc = np.array([[parts.done[(e, i)] for i in range(len(p.layers))] for e in epochs], dtype=np.float64)
    subsets = rewinder.task.subsets
    acc = acc.reshape(len(epochs), len(p.layers), len(subsets))
    ds = xr.Dataset({"accuracy": (("checkpoint", "layer", "subset"), acc),
                     "baseline": (("subset",), rewinder.baseline)},
                    coords={"checkpoint": np.array(epochs, dtype=np.int64), **layer_coords(p.layers),
                            "subset": list(subsets)})
    result = Result("rewind", ds, config=config)
    return result


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    add_checkpoints(p, "checkpoints to rewind to")
    add_layers(p)
    add_eval_batch_size(p)
    add_precision(p)


def _cli_execute(args):
    return rewind(args.run, checkpoints=args.checkpoints, layers=args.layers,
                  eval_batch_size=args.eval_batch_size, device=args.device,
                  resume="auto", overwrite=args.overwrite, precision=args.precision)


def _cli_summary(res, args):
    subsets = list(res["subset"].values)
    first = res["accuracy"].isel(checkpoint=0)
    return (f"{res.sizes['checkpoint']} checkpoints x {res.sizes['layer']} layers; final model "
            f"(epoch {res.config['final_epoch']}): {describe(res['baseline'].values, subsets)}\n"
            f"rewound to epoch {int(res['checkpoint'][0])}:\n" + layer_table(res["layer"].values, subsets, first.values))


def plot_rewind(res, out, run=None) -> str:
    """Heatmaps [layer x rewind epoch] of clean / noisy / test accuracy."""
    layers, subsets, epochs = coord_names(res), coord_names(res, "subset"), res["checkpoint"].values
    acc, base = res["accuracy"].values, res["baseline"].values   # (R, L, S), (S,)
    name = heatmaps(acc.transpose(1, 0, 2), subsets, layers, epochs, "rewound to epoch",
                     "rewinding one layer of the final model", out, "rewind.png")
    e0, w = int(np.argmin(epochs)), groups(run)
    return ("## Layer rewinding\n\nOne layer at a time is put back to an earlier checkpoint.\n\n"
            + figure("rewind", name, "one heatmap per subset; each cell is the accuracy (colour) with one layer "
                     "(row) put back to the checkpoint of one epoch (column). The layer whose rewinding loses the "
                     f"{w['memorised']} while the {w['clean']}' and {w['test']} accuracy stay high is where they are "
                     "stored.")
            + "\n\n"
            f"Accuracy (%) with the layer rewound to epoch {epochs[e0]}:\n\n"
            + accuracy_rows(layers, subsets, acc[e0], base, "(no rewinding)"))


ANALYSIS = Analysis(
    name="rewind", order=30, compute=rewind,
    plot=plot_rewind,
    schema=Schema("rewind", "one layer at a time put back to an earlier checkpoint (memloc.rewind)",
                  {"checkpoint": Var(("checkpoint",), "epoch of the checkpoint the layer is rewound to"),
                   **layer_vars(), **SUBSET_VAR},
                  {"accuracy": Var(("checkpoint", "layer", "subset"), "accuracy with the layer rewound"),
                   "baseline": Var(("subset",), "accuracy of the model itself")}),
    command=Command(name="rewind", group="localisation", example="memloc rewind RUN --checkpoints 0,final",
                    help='rewind one layer at a time to an earlier checkpoint; clean / noisy / test accuracy',
                    sharded=True,
                    description="Rewind one layer at a time of the final model to an earlier checkpoint (parameters and norm "
                                "buffers) and record accuracy on clean train, noisy train (given and true labels) and test. "
                                "Writes RUN/results/rewind.h5; an interrupted run continues when the same command is run again.",
                    interrupted="finished work is saved (rerun to continue)",
                    overwrite_help="replace an existing rewind.h5 (or an interrupted rewind saved with other settings)",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
