"""Gradient accounting per layer: how much do clean and mislabeled examples pull on each layer?

``memloc.gradients(run_or_model, data=None, *, checkpoints="all", layers=None, bn_mode="eval")``
(command: ``python -m memloc gradients RUN``).

On a language model's run the memorisation targets are the noisy examples, the other training
sequences the clean ones, and an example's loss is its suffix loss (mean cross-entropy over the
suffix tokens; :mod:`memloc.core.tasks`).

For every checkpoint epoch and every layer, with ``g_c`` the gradient of the mean cross-entropy
over the *clean* training examples, ``g_n`` over the *noisy* ones (w.r.t. their given labels)
and ``g = (n_c g_c + n_n g_n) / N`` the gradient of the mean over all training examples:

* ``norm_clean = ||g_c|| / sqrt(numel)``, ``norm_noisy``, ``norm_total`` likewise (numel = the
  layer's parameter count, so layers of different sizes are comparable);
* ``cosine = <g_c, g_n> / (||g_c|| ||g_n||)`` (NaN when either is zero).

One forward and two backward passes per batch (the clean part with ``retain_graph``, then the
noisy part). Norm layers run in eval mode (running statistics) by default; ``bn_mode="train"``
uses batch statistics (on a copy of the model, so no running statistic changes). Weight decay
is not part of the loss.

Returns a :class:`memloc.core.results.Result` ``"gradients"``: ``norm`` (epoch, layer, subset) with
subset = clean / noisy / all, and ``cosine`` (epoch, layer).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn
import xarray as xr

from ..core.examples import ExampleSet
from ..scale.distributed import shard, world
from ..core.dropout import auto_as_test
from ..core.errors import MemlocError
from ..core.evaluate import eval_mode
from ..scale.parts import Parts, parts_folder
from ..core.results import Result
from ..core.precision import apply_channels_last, autocast, check_precision
from ..core.runtime import check_range, progress
from ..core.tasks import ClassifierTask, task_of
from ..core.schemas import GRADIENT_PARTS
from ..core.selection import layer_coords, prepare
from ..core.units import NORM_TYPES, Layer
from ..core.options import add_checkpoints, add_layers, add_precision, layer_table, positive_int
from ..core.figures import groups, figure, plt, COLORS, save_figure, table, short_names, coord_names, grid
from ..core.schemas import Schema, Var, layer_vars
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored

__all__ = ["QUANTITIES", "BN_MODES", "layer_gradients", "gradients"]

QUANTITIES = ("norm_clean", "norm_noisy", "norm_total", "cosine")
BN_MODES = ("eval", "train")


@contextlib.contextmanager
def _in_mode(model: nn.Module, bn_mode: str):
    """``model`` in eval mode, or a copy with its norm layers in train mode (``bn_mode="train"``)."""
    if bn_mode not in BN_MODES:
        raise MemlocError(f"unknown bn_mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    if bn_mode == "train":
        model = copy.deepcopy(model).eval()  # batch statistics would update the caller's running stats
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                m.train()
        with auto_as_test(model):
            yield model
        return
    with eval_mode(model):
        yield model


def layer_gradients(model: nn.Module, examples: ExampleSet, is_noisy, layers: Sequence[Layer], *,
                    batch_size: int = 1024, bn_mode: str = "eval", losses=None,
                    precision: str = "fp32") -> dict[str, np.ndarray]:
    """Per-layer norms of the clean / noisy / total mean-loss gradients and their cosine.

    Parameters
    ----------
    model : classifier whose parameters of ``layers`` require grad (its ``.grad`` fields and, with
        ``bn_mode="train"``, its running statistics are left untouched).
    examples : the training examples, labels ``y`` = the given (possibly wrong) labels.
    is_noisy : (N,) bool, indexed by example id (``examples.idx``).
    layers : the layers to report (from :func:`memloc.core.units.trace`).
    bn_mode : ``eval`` (running statistics) or ``train`` (batch statistics, batches in order).
    losses : ``losses(model, x, y) -> (B,)`` per-example losses (default: cross-entropy w.r.t. ``y``;
        a language model's: :meth:`memloc.core.tasks.SequenceTask.losses`).
    precision : ``fp32``, ``bf16`` or ``fp16``: the forward passes under autocast.

    Returns
    -------
    ``{q: (L,) float64 array}`` for ``q`` in :data:`QUANTITIES`.
    """
    with _in_mode(model, bn_mode) as m:
        sums = _gradient_sums(m, examples, is_noisy, layers, batch_size,
                              ClassifierTask.losses if losses is None else losses, precision)
    noisy_all = np.asarray(is_noisy, dtype=bool)[examples.idx.cpu().numpy()]
    n, n_noisy = len(noisy_all), int(noisy_all.sum())
    n_clean = n - n_noisy
    out = {q: np.full(len(layers), np.nan) for q in QUANTITIES}
    for j, layer in enumerate(layers):
        if not layer.params:  # e.g. a norm without affine parameters
            continue
        gc, gn = (torch.cat([g.flatten() for g in sums[part][layer.name]]).double()
                  for part in ("clean", "noisy"))
        root = max(layer.numel, 1) ** 0.5
        norm_c, norm_n = float(gc.norm()), float(gn.norm())
        if n_clean:
            out["norm_clean"][j] = norm_c / root
        if n_noisy:
            out["norm_noisy"][j] = norm_n / root
        out["norm_total"][j] = float((gc * (n_clean / n) + gn * (n_noisy / n)).norm()) / root
        if norm_c > 0 and norm_n > 0:
            out["cosine"][j] = float(gc @ gn) / (norm_c * norm_n)
    return out


def _gradient_sums(model, examples, is_noisy, layers, batch_size, losses_of, precision):
    """``{"clean"|"noisy": {layer name: [grad per parameter]}}`` of the mean clean / noisy loss."""
    state = dict(model.named_parameters())
    names = [(l.name, k) for l in layers for k in l.params]
    params = [state[k] for _, k in names]
    frozen = [k for _, k in names if not state[k].requires_grad]
    if frozen:
        raise ValueError(f"parameter {frozen[0]!r} does not require grad")
    noisy_by_id = torch.as_tensor(np.asarray(is_noisy, dtype=bool), device=examples.y.device)
    n_noisy = int(noisy_by_id[examples.idx].sum())
    counts = {"clean": len(examples) - n_noisy, "noisy": n_noisy}
    sums = {part: [torch.zeros_like(p) for p in params] for part in counts}
    for x, y, idx in progress(examples.batches(batch_size), desc="gradients", unit="batch",
                                  total=-(-len(examples) // batch_size)):
        with autocast(precision, x.device):
            losses = losses_of(model, x, y).float()
        noisy = noisy_by_id[idx]
        parts = [(part, losses[mask].sum() / counts[part])
                 for part, mask in (("clean", ~noisy), ("noisy", noisy)) if mask.any()]
        for i, (part, loss) in enumerate(parts):  # two backward passes through one forward graph
            grads = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(parts), allow_unused=True)
            for acc, g in zip(sums[part], grads):
                if g is not None:
                    acc += g
    out = {part: {l.name: [] for l in layers} for part in counts}
    for part in counts:
        for (layer, _), g in zip(names, sums[part]):
            out[part][layer].append(g)
    return out


@renamed(batch_size="eval_batch_size", resume_dir="resume")
@stored('gradients')
def gradients(source, data=None, *, checkpoints="all", layers=None, bn_mode: str = "eval",
              eval_batch_size: int = 1024, device="auto", resume=None, overwrite: bool = False,
              precision: str = "fp32") -> Result | None:
    """:func:`layer_gradients` at every selected checkpoint of a run (or of a model).

    ``source``: a :class:`memloc.Run` / run path, or an ``nn.Module`` with ``data`` (then
    ``checkpoints`` is ``{epoch: state_dict}`` or None for its own weights, epoch -1); ``layers``:
    names (default all). Returns the ``"gradients"`` result: ``norm`` (epoch, layer, subset) and
    ``cosine`` (epoch, layer).

    ``resume``: folder of resumable part files (:class:`memloc.scale.parts.Parts`; ``"auto"``:
    ``RUN/results/gradients.partial`` for a run, as ``memloc gradients`` uses; None, the default:
    nothing saved in one process): each finished checkpoint is saved there, and a rerun with the
    same settings takes it instead of recomputing it (``overwrite`` discards parts made with other
    settings); they are deleted when the result is saved (:meth:`memloc.Result.save`). Under
    torchrun (:mod:`memloc.scale.distributed`) the checkpoints are split across the processes (None then
    means ``"auto"``) and rank 0 returns the merged result, the other ranks None.

    A language model's run (or a causal LM with a :class:`memloc.core.sequences.SequenceSet`): the
    targets are the noisy examples and the loss is the suffix loss (:mod:`memloc.core.tasks`).

    ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the forward passes under autocast
    (:mod:`memloc.core.precision`; the gradients are of float32 parameters, and fp16's are not loss-scaled:
    bf16 is the safer 16-bit choice); recorded in the config.
    """
    check_precision(precision)
    if bn_mode not in BN_MODES:
        raise MemlocError(f"unknown bn_mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    p = prepare(source, data, device=device, layers=layers, checkpoints=checkpoints)
    check_precision(precision, p.device)
    task = task_of(p.data)
    model = copy.deepcopy(p.model).requires_grad_(True)
    apply_channels_last(model, precision, p.device)
    epochs = list(p.states)
    config = {"checkpoints": epochs, "layers": [l.name for l in p.layers], "bn_mode": bn_mode,
              "batch_size": eval_batch_size, "device": str(p.device),
              "loss": "cross_entropy mean" if isinstance(task, ClassifierTask) else "suffix cross_entropy mean",
              "normalisation": "norm / sqrt(numel)", "precision": precision}
    parts = Parts(parts_folder(resume, p.run, "gradients"), {**config, "device": p.device.type},
                  what="gradients", overwrite=overwrite)
    try:        # one item per checkpoint: its (layer, quantity) array
        for epoch in progress(shard([e for e in epochs if (e,) not in parts.done]), desc="checkpoints",
                              unit="checkpoint"):
            model.load_state_dict(p.state(epoch))
            row = layer_gradients(model, task.train, task.is_noisy, p.layers, batch_size=eval_batch_size,
                                  bn_mode=bn_mode, losses=task.losses, precision=precision)
            parts.add({(epoch,): np.stack([row[q] for q in QUANTITIES], -1).reshape(len(p.layers), len(QUANTITIES))})
        parts.gather()
    finally:
        parts.release()
    if world()[0] > 0:
        return None             # rank 0 merges the parts and returns the result
    rows = [dict(zip(QUANTITIES, parts.done[(e,)].T)) for e in epochs]
    norm = np.stack([np.stack([r[f"norm_{'total' if part == 'all' else part}"] for part in GRADIENT_PARTS], -1)
                     for r in rows]).reshape(len(rows), len(p.layers), len(GRADIENT_PARTS))
    cosine = np.stack([r["cosine"] for r in rows]).reshape(len(rows), len(p.layers))
    ds = xr.Dataset({"norm": (("checkpoint", "layer", "subset"), norm), "cosine": (("checkpoint", "layer"), cosine)},
                    coords={"checkpoint": np.array(list(p.states), dtype=np.int64), **layer_coords(p.layers),
                            "subset": list(GRADIENT_PARTS)})
    result = Result("gradients", ds, config=config)
    return result


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    add_checkpoints(p, "checkpoints to analyse")
    add_layers(p)
    p.add_argument("--bn-mode", choices=BN_MODES, default="eval",
                   help="norm layers use running statistics (eval) or batch statistics (train; the "
                        "checkpoints' running statistics are not changed)")
    p.add_argument("--batch-size", type=positive_int, default=1024,
                   help="examples per forward pass (with --bn-mode train also the statistics batch)")
    add_precision(p)


def _cli_execute(args):
    return gradients(args.run, checkpoints=args.checkpoints, layers=args.layers, bn_mode=args.bn_mode,
                     eval_batch_size=args.batch_size, device=args.device, resume="auto", overwrite=args.overwrite,
                     precision=args.precision)


def _cli_summary(res, args):
    epochs = res["checkpoint"].values
    shown = epochs >= 2 if epochs.max() >= 2 else np.ones(len(epochs), bool)
    with np.errstate(all="ignore"):
        means = np.concatenate([np.nanmean(res["norm"].values[shown], axis=0),
                                np.nanmean(res["cosine"].values[shown], axis=0)[:, None]], axis=1)
    label = ", ".join(map(str, epochs[shown])) if shown.sum() < 6 else ">= 2"
    return (f"{len(epochs)} checkpoints x {res.sizes['layer']} layers; means over epochs {label}:\n"
            + layer_table(res["layer"].values, ["norm_clean", "norm_noisy", "norm_all", "cosine"], means, fmt="10.3g"))


def plot_gradients(res, out, run=None) -> str:
    """Per-layer gradient norms (clean / noisy / all) over epochs and the clean-noisy cosine heatmap."""
    layers, epochs = coord_names(res), res["checkpoint"].values
    q = {f"norm_{'total' if k == 'all' else k}": res["norm"].sel(subset=k).values for k in ("clean", "noisy", "all")}
    q["cosine"] = res["cosine"].values
    n, w = len(layers), groups(run)
    fig, axes = grid(n, sharex=True)
    for i, ax in enumerate(axes.flat[:n]):
        for key in ("clean", "noisy", "total"):
            ax.plot(epochs, q[f"norm_{key}"][:, i], color=COLORS[key], label=w.get(key, key))
        ax.set_yscale("log")
        ax.set_title(short_names([layers[i]])[0], fontsize=9)
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("||grad|| / sqrt(#params)")
    axes[0, 0].legend(fontsize=7)
    norms = save_figure(fig, out, "gradients_norms.png")
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(epochs) + 2), max(2.5, 0.35 * n + 1.2)))
    im = ax.imshow(q["cosine"].T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks(range(n), short_names(layers), fontsize=7)
    step = max(1, len(epochs) // 15)
    ax.set_xticks(range(0, len(epochs), step), epochs[::step])
    ax.set(xlabel="epoch", title=f"cosine({w['clean']}' gradient, {w['noisy']}' gradient)")
    fig.colorbar(im, ax=ax)
    cos = save_figure(fig, out, "gradients_cosine.png")
    later = epochs >= 2
    rows = [[layers[i], f"{np.nanmean(q['norm_clean'][later, i]):.3g}", f"{np.nanmean(q['norm_noisy'][later, i]):.3g}",
             float(np.nanmean(q["cosine"][later, i]))] for i in range(n)]
    return ("## Gradient accounting\n\nNorm of the gradient of the mean loss of the " + w["clean"] + ", of the "
            + w["noisy"] + " and of " + w["all"] + ", per parameter, and the cosine between the first two.\n\n"
            + figure("gradient norms", norms, f"one panel per layer: the gradient norm of the mean loss of the {w['clean']}, "
                     f"the {w['noisy']} and {w['all']} over training (log scale). Once the {w['noisy']}' curve lies "
                     f"above the {w['clean']}' one, the {w['noisy']} drive what the layer learns.") + "\n\n"
            + figure("cosine", cos, f"the cosine between the {w['clean']}' and the {w['noisy']}' gradient per layer "
                     "(row) and epoch (column): blue (below 0) means the two pull the layer's weights in opposite "
                     "directions.")
            + "\n\nMeans over epochs >= 2:\n\n"
            + table(["layer", f"{w['clean']}: norm", f"{w['noisy']}: norm", "cosine"], rows))


ANALYSIS = Analysis(
    name="gradients", order=20, compute=gradients,
    plot=plot_gradients,
    schema=Schema("gradients", "per-layer gradient accounting (memloc.gradients)",
                  {"checkpoint": Var(("checkpoint",), "checkpoint epoch (-1: a model passed in directly)"), **layer_vars(),
                   "subset": Var(("subset",), "clean, noisy, all: whose mean loss the gradient is of")},
                  {"norm": Var(("checkpoint", "layer", "subset"), "L2 norm of the gradient of the subset's mean loss / sqrt(layer_numel)"),
                   "cosine": Var(("checkpoint", "layer"), "cosine between the clean and the noisy gradient (NaN if one is 0)")}),
    command=Command(name="gradients", group="localisation", example="memloc gradients RUN",
                    help='per-layer gradient norms of clean / noisy / all losses and their cosine, per checkpoint',
                    sharded=True, flags={"eval_batch_size": "--batch-size"},
                    interrupted="finished work is saved (rerun to continue)",
                    overwrite_help="replace an existing gradients.h5 (or an interrupted gradients run saved with other settings)",
                    description="Per-layer gradient norms of the mean clean, noisy and total training loss (divided by "
                                "sqrt(#params of the layer)) and the cosine between the clean and noisy gradients, at every "
                                "chosen checkpoint. Writes RUN/results/gradients.h5.",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
