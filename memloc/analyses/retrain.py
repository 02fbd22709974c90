"""Layer retraining: reset one layer to its initialisation and retrain only it on clean data.

``memloc.retrain(run_or_model, data=None, *, layers=None, epochs=20, lr=0.1, checkpoint=0)``
(command: ``python -m memloc retrain RUN``).

For every layer, a copy of the final model gets that layer's tensors (parameters and its norm's
buffers) from checkpoint ``checkpoint`` (default 0, the initialisation); every other parameter
is frozen and every other module stays in eval mode, so no other parameter *or buffer* (e.g.
another layer's BatchNorm running statistics) changes. Only the layer is trained, on the clean
training examples, with SGD (momentum, weight decay; ``optimizer="adam"``: AdamW) and a one-cycle
schedule (learning rate rising linearly from 0 to ``--lr`` at the middle of training, then back to 0). After every epoch
(and before the first) the model is evaluated on the subsets of :data:`memloc.core.evaluate.SUBSETS`. A
layer that clean data alone can bring back to high clean and test accuracy, while the noisy
labels stay unlearned, is not needed for memorisation. Seeded and deterministic.

Returns the ``"retrain"`` result: ``accuracy`` (layer, epoch, subset) with epoch = 0..E and
``baseline`` (subset), the final model's accuracies.

On a language model's run the layer is retrained on the non-target training sequences with the
next-token loss over whole sequences (the trainer's), and the subsets are
:data:`memloc.core.schemas.LM_SUBSETS` (memorised shares of clean sequences and of the targets,
clean and held-out suffix token accuracy, held-out suffixes reproduced; :mod:`memloc.core.tasks`).

Everything that runs before the retrained layer is frozen: with ``prefix_cache`` (default) its
output is computed once for the whole dataset and every training and evaluation pass starts from
it (see :mod:`memloc.scale.prefix`; the same results, bit for bit; training batches take the cached rows
only where their batch sizes are checked to round as a batch of their own does).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
import xarray as xr

from ..scale.distributed import claim, world
from ..scale.handoff import Handoff
from ..core.errors import MemlocError
from ..core.optim import OPTIMIZERS, epoch_seed, make_optimizer, make_schedule
from ..scale.parts import Parts, parts_folder
from ..core.precision import apply_channels_last, autocast, check_precision, grad_scaler
from ..scale.prefix import CACHE_MB, PrefixCache
from ..core.results import Result
from ..core.runtime import check_flag, check_range, progress
from ..core.selection import copy_layer, layer_coords, prepare
from ..core.tasks import task_of
from ..core.units import Layer
from ..core.options import add_eval_batch_size, add_layers, add_precision, describe, layer_table, nonnegative_float, nonnegative_int, number, positive_float, positive_int
from ..core.figures import (groups, figure, save_figure, short_names, coord_names, grid, accuracy_rows, subset_color,
                            subset_label)
from ..core.schemas import Schema, Var, layer_vars, SUBSET_VAR
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored

__all__ = ["HYPER", "retrain_layer", "retrain"]

# Retraining hyper-parameters (the paper's: 20 epochs, one-cycle peaking at lr 0.1 mid-way).
HYPER = dict(
    epochs=20,           # retraining epochs
    lr=0.1,              # peak learning rate, reached half-way
    batch_size=128,
    momentum=0.9,        # SGD with Nesterov momentum
    weight_decay=5e-4,
    seed=0,              # batch order (and any randomness of the layer's own modules)
    optimizer="sgd",     # sgd, or adam (AdamW: what language models are trained with; momentum unused)
)
BASELINE = (-1,)         # under torchrun, the part key of the final model's accuracies (the layers' keys are (i,))


def retrain_layer(model: nn.Module, init: dict[str, torch.Tensor], layer: Layer, data, *,
                  epochs: int = HYPER["epochs"], lr: float = HYPER["lr"],
                  batch_size: int = HYPER["batch_size"], momentum: float = HYPER["momentum"],
                  weight_decay: float = HYPER["weight_decay"], seed: int = HYPER["seed"],
                  optimizer: str = HYPER["optimizer"], eval_batch_size: int = 1024, prefix_cache: bool = True,
                  prefix_cache_mb: float = CACHE_MB, precision: str = "fp32") -> tuple[np.ndarray, nn.Module]:
    """Reset ``layer`` of a copy of ``model`` to ``init`` and retrain only it on the clean training
    examples (a language model: the non-target sequences, :mod:`memloc.core.tasks`).

    Parameters
    ----------
    model : the trained model (not modified).
    init : a state_dict holding the layer's reset tensors (e.g. the epoch-0 checkpoint).
    layer : the layer to reset and retrain (its modules run in train mode, all others in eval).
    data : :class:`memloc.core.data.Data` on the model's device (or a language model's
        :class:`memloc.core.sequences.SequenceSet`).
    prefix_cache : compute what runs before the layer once (within ``prefix_cache_mb`` MiB of
        activations; :class:`memloc.scale.prefix.PrefixCache`) instead of in every pass. Same results.
    precision : ``"fp32"``, ``"bf16"`` or ``"fp16"``: forward passes and the loss under autocast, the
        fp16 loss scaled (:mod:`memloc.core.precision`).

    Returns
    -------
    curve : (epochs + 1, S) accuracies over the data's subsets (:data:`memloc.core.evaluate.SUBSETS`, a
        language model's :data:`memloc.core.schemas.LM_SUBSETS`); row 0 = just after the reset.
    model : the retrained copy.
    """
    r = _Retraining(model, init, layer, data, eval_batch_size=eval_batch_size, prefix_cache=prefix_cache,
                    prefix_cache_mb=prefix_cache_mb, precision=precision, batch_size=batch_size, seed=seed)
    curve = [r.row()]
    r.train(lambda epoch: curve.append(r.row()), epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
            weight_decay=weight_decay, seed=seed, optimizer=optimizer)
    return np.asarray(curve, dtype=np.float64), r.work


class _Retraining:
    """A copy of the model with ``layer`` reset to ``init`` and every parameter frozen, its prefix cache,
    the training of the layer (:meth:`train`) and the evaluation of its tensors (:meth:`row`)."""

    def __init__(self, model, init, layer: Layer, data, *, eval_batch_size, prefix_cache, prefix_cache_mb,
                 precision, batch_size, seed):
        self.work, self.layer, self.precision, self.eval_batch_size = copy.deepcopy(model).eval(), layer, precision, eval_batch_size
        copy_layer(self.work, init, layer)
        for p in self.work.parameters():
            p.requires_grad_(False)
        self.task = task_of(data)
        clean = self.task.clean_train
        self.device = clean.y.device
        with autocast(precision, self.device):
            self.cache = PrefixCache(self.work, [layer], data, batch_size=eval_batch_size, budget_mb=prefix_cache_mb,
                                     extra_rows=len(clean), enabled=prefix_cache and self.task.prefix_cache)
            self.net, self.cached = self.cache.pick(0)
        self.clean, self.batch_size, self.seed = clean, batch_size, seed

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the layer's tensors (parameters and buffers) as they are now."""
        own = self.work.state_dict(keep_vars=True)
        return {k: own[k].detach().clone() for k in self.layer.keys}

    def row(self, state: dict[str, torch.Tensor] | None = None) -> np.ndarray:
        """The accuracies over the data's subsets with the layer's tensors as they are (or ``state``'s)."""
        if state is not None:
            copy_layer(self.work, state, self.layer)
        with autocast(self.precision, self.device):
            return np.asarray(self.task.subset_row(self.net, self.cached, batch_size=self.eval_batch_size),
                              dtype=np.float64)

    def train(self, after_epoch, *, epochs, lr, batch_size, momentum, weight_decay, seed, optimizer) -> None:
        """Retrain the layer alone, calling ``after_epoch(epoch)`` after every epoch (1..epochs) in eval
        mode; nothing is trained (and ``after_epoch`` is still called) when the layer has no parameters."""
        work, task, clean, precision = self.work, self.task, self.clean, self.precision
        params = dict(work.named_parameters())
        trainable = [params[k].requires_grad_(True) for k in self.layer.params]
        if not trainable:  # e.g. a norm without affine parameters: nothing to retrain
            for epoch in range(1, epochs + 1):
                after_epoch(epoch)
            return
        modules = dict(work.named_modules())
        own = [modules[m] for m in self.layer.modules if m in modules]
        with autocast(precision, self.device):
            train_net, train_set = _training_pass(self.cache, clean,
                                                  self.cached.clean_train if self.net is not work else None,
                                                  batch_size, seed)
        steps = max(1, -(-len(clean) // batch_size)) * epochs
        opt = make_optimizer(trainable, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = make_schedule(opt, steps, "onecycle", 0.5)
        scaler = grad_scaler(precision, self.device)
        device = trainable[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for epoch in range(1, epochs + 1):
                for m in own:
                    m.training = True  # the layer's own modules only (not their children)
                gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
                for x, y, _ in train_set.batches(batch_size, shuffle=True, generator=gen):
                    if len(y) < 2:  # a single example breaks batch-statistics norms
                        continue
                    with autocast(precision, device):
                        loss = task.train_loss(train_net, x, y)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                work.eval()
                after_epoch(epoch)


def _training_pass(cache: PrefixCache, clean, cached_clean, batch_size: int, seed: int):
    """``(net, examples)`` for the training batches: the cut and the cached clean rows when the
    batch sizes of an epoch (a full batch, the last one) take them bit for bit, else the model and ``clean``."""
    if cached_clean is None:
        return cache.model, clean
    order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(epoch_seed(seed, 1)))
    tail = len(clean) % batch_size
    probes = [order[:batch_size]] + ([order[-tail:]] if tail > 1 else [])  # single rows are skipped
    for rows in probes:
        rows = rows.to(clean.y.device)
        if not cache.same_rows(0, clean.x[rows], cached_clean.x[rows]):
            return cache.model, clean
    return cache.pick(0)[0], cached_clean


@renamed(reset_to="checkpoint", resume_dir="resume")
@stored('retrain')
def retrain(source, data=None, *, layers=None, checkpoint=0, epochs: int = HYPER["epochs"],
            lr: float = HYPER["lr"], batch_size: int = HYPER["batch_size"], momentum: float = HYPER["momentum"],
            weight_decay: float = HYPER["weight_decay"], seed: int = HYPER["seed"],
            optimizer: str = HYPER["optimizer"], eval_batch_size: int = 1024, device="auto", prefix_cache: bool = True,
            prefix_cache_mb: float = CACHE_MB, resume=None, overwrite: bool = False,
            precision: str = "fp32") -> Result | None:
    """:func:`retrain_layer` for every layer (or those named in ``layers``) of the final model.

    ``source``: a :class:`memloc.Run` / run path (``checkpoint``: a checkpoint epoch), or an
    ``nn.Module`` with ``data`` (``checkpoint``: a state_dict holding the layers' reset tensors).
    ``prefix_cache=False`` recomputes the whole model in every pass (see :func:`retrain_layer`).
    Returns the ``"retrain"`` result: ``accuracy`` (layer, epoch, subset) and ``baseline`` (subset).

    ``resume``: folder of resumable part files (:class:`memloc.scale.parts.Parts`; ``"auto"``:
    ``RUN/results/retrain.partial`` for a run, as ``memloc retrain`` uses; None, the default:
    nothing saved in one process): each retrained layer is saved there, and a rerun with the same
    settings takes them instead of recomputing them (``overwrite`` discards parts made with other
    settings); they are deleted when the result is saved (:meth:`memloc.Result.save`). Under
    torchrun (:mod:`memloc.scale.distributed`) the layers are claimed by whichever process is free and their
    per-epoch evaluations handed off to free processes (:func:`_split`; None then means ``"auto"``), and
    rank 0 returns the merged result, the other ranks None.

    ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (see :func:`retrain_layer`); recorded
    in the config.
    """
    epochs = check_range("epochs", epochs, low=1, integer=True)
    batch_size = check_range("batch_size", batch_size, low=1, integer=True)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    momentum = check_range("momentum", momentum, low=0, high=1, high_open=True)
    weight_decay = check_range("weight_decay", weight_decay, low=0)
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    lr = check_range("lr", lr, low=0)
    prefix_cache_mb = check_range("prefix_cache_mb", prefix_cache_mb, low=0)
    prefix_cache = check_flag("prefix_cache", prefix_cache)
    check_precision(precision)
    if optimizer not in OPTIMIZERS:
        raise MemlocError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}", argument="optimizer")
    if not lr > 0:
        raise MemlocError(f"lr must be positive, got {lr}", argument="lr")
    if isinstance(source, nn.Module) and not isinstance(checkpoint, dict):
        raise MemlocError("checkpoint must be a state_dict when a model is passed instead of a run")
    if not isinstance(checkpoint, dict):
        checkpoint = check_range("checkpoint", checkpoint, low=0, integer=True)
    p = prepare(source, data, device=device, layers=layers, checkpoints=None if isinstance(source, nn.Module) else "final")
    init = checkpoint if isinstance(checkpoint, dict) else p.run.checkpoint(checkpoint)
    check_precision(precision, p.device)
    apply_channels_last(p.model, precision, p.device)
    hyper = dict(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, seed=seed,
                 optimizer=optimizer)
    config = {**hyper, "reset_to": checkpoint if not isinstance(checkpoint, dict) else "state_dict",
              "layers": [l.name for l in p.layers], "eval_batch_size": eval_batch_size, "device": str(p.device),
              "final_epoch": p.run.final_epoch if p.run is not None else None,
              "schedule": "onecycle, peak at 0.5", "train_subset": "clean", "precision": precision}
    parts = Parts(parts_folder(resume, p.run, "retrain"), {**config, "device": p.device.type}, what="retrain",
                  overwrite=overwrite)
    todo = [i for i in range(len(p.layers)) if (i,) not in parts.done]
    setup = dict(eval_batch_size=eval_batch_size, prefix_cache=prefix_cache, prefix_cache_mb=prefix_cache_mb,
                 precision=precision)
    task = task_of(p.data)
    try:
        if world()[1] == 1:
            for i in progress(todo, desc="retrain", unit="layer"):
                curve = retrain_layer(p.model, init, p.layers[i], p.data, **setup, **hyper)[0]
                parts.add({(i,): curve})
        else:
            _split(p, init, todo, parts, setup, hyper)
        parts.gather()
    finally:
        parts.release()
    if world()[0] > 0:
        return None             # rank 0 merges the parts and returns the result
    baseline = parts.done.pop(BASELINE) if BASELINE in parts.done else _baseline(p, task, setup)
    curves = [parts.done[(i,)] for i in range(len(p.layers))]
    acc = np.stack(curves) if curves else np.zeros((0, epochs + 1, len(task.subsets)))
    ds = xr.Dataset({"accuracy": (("layer", "epoch", "subset"), acc), "baseline": (("subset",), baseline)},
                    coords={**layer_coords(p.layers), "epoch": np.arange(epochs + 1), "subset": list(task.subsets)})
    result = Result("retrain", ds, config=config)
    return result


def _baseline(p, task, setup: dict) -> np.ndarray:
    """The final model's accuracies over the data's subsets."""
    with autocast(setup["precision"], p.device):
        return np.asarray(task.subset_row(p.model, batch_size=setup["eval_batch_size"]), dtype=np.float64)


def _split(p, init, todo: list[int], parts: Parts, setup: dict, hyper: dict) -> None:
    """The layers ``todo`` retrained under torchrun, claimed first to last by whichever rank is free; each
    epoch's tensors (0 = the reset) go to a :class:`memloc.scale.handoff.Handoff` (copied once a rank is idle),
    evaluated by their maker or an idle rank; the first rank out of layers evaluates the final model (part
    :data:`BASELINE`). Each evaluation sees one process's tensors: the same curves, bit for bit."""
    epochs = hyper["epochs"]
    handoff = Handoff({i: epochs + 1 for i in todo})
    held: dict[int, _Retraining] = {}           # the one layer this rank can evaluate without setting it up

    def finish(i, j, row):
        rows = handoff.done(i, j, row)
        if rows is not None:
            parts.add({(i,): np.stack(rows)})

    make = dict(batch_size=hyper["batch_size"], seed=hyper["seed"])
    for i in progress(claim(todo), desc="retrain", unit="layer"):
        r = _Retraining(p.model, init, p.layers[i], p.data, **setup, **make)
        states = [r.state()]
        handoff.put(i, 0, states[0])

        def after_epoch(epoch):
            states.append(r.state())
            handoff.put(i, epoch, states[-1])
        r.train(after_epoch, **hyper)
        held = {i: r}
        for j in handoff.take(i):
            finish(i, j, r.row(states[j]))
    for _ in claim([BASELINE]):
        parts.add({BASELINE: _baseline(p, task_of(p.data), setup)})
    for i, j, state in handoff.ready(prefer=lambda i: i in held):
        if i not in held:
            held = {i: _Retraining(p.model, init, p.layers[i], p.data, **setup, **make)}
        finish(i, j, held[i].row(state))


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    add_layers(p)
    p.add_argument("--reset-checkpoint", type=nonnegative_int, default=0,
                   help="checkpoint epoch whose tensors the layer is reset to (0 = initialisation)")
    p.add_argument("--epochs", type=positive_int, default=HYPER["epochs"], help="retraining epochs")
    p.add_argument("--lr", type=positive_float, default=HYPER["lr"],
                   help="peak learning rate of the one-cycle schedule (reached half-way)")
    p.add_argument("--batch-size", type=positive_int, default=HYPER["batch_size"], help="retraining batch size")
    p.add_argument("--momentum", type=number(float, 0, 1, high_open=True), default=HYPER["momentum"], help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=nonnegative_float, default=HYPER["weight_decay"],
                   help="weight decay of the retrained layer")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=HYPER["seed"], help="seed of the batch order")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default=HYPER["optimizer"],
                   help="sgd (Nesterov momentum) or adam (AdamW, as language models are trained; --momentum unused)")
    add_eval_batch_size(p)
    add_precision(p)


def _cli_execute(args):
    return retrain(args.run, layers=args.layers, checkpoint=args.reset_checkpoint, epochs=args.epochs, lr=args.lr,
                   batch_size=args.batch_size, momentum=args.momentum, weight_decay=args.weight_decay,
                   seed=args.seed, optimizer=args.optimizer, eval_batch_size=args.eval_batch_size, device=args.device,
                   resume="auto", overwrite=args.overwrite, precision=args.precision)


def _cli_summary(res, args):
    subsets = list(res["subset"].values)
    return (f"{res.sizes['layer']} layers x {args.epochs} epochs; final model: "
            f"{describe(res['baseline'].values, subsets)}\n"
            f"after retraining (reset to checkpoint {args.reset_checkpoint}):\n"
            + layer_table(res["layer"].values, subsets, res["accuracy"].isel(epoch=-1).values))


def plot_retrain(res, out, run=None) -> str:
    """Curves per layer of clean / noisy / test accuracy while retraining it on clean data."""
    layers, subsets, epochs = coord_names(res), coord_names(res, "subset"), res["epoch"].values
    acc, base = res["accuracy"].values, res["baseline"].values   # (L, E+1, S)
    n = len(layers)
    fig, axes = grid(n, sharey=True)
    for i, ax in enumerate(axes.flat[:n]):
        for j, sub in enumerate(subsets):
            ax.plot(epochs, 100 * acc[i, :, j], color=subset_color(sub), label=subset_label(sub, subsets))
        ax.set_title(short_names([layers[i]])[0], fontsize=9)
        ax.set_ylim(0, 101)
        ax.set_xlabel("retraining epoch")
        ax.set_xticks(epochs[::max(1, -(-len(epochs) // 6))])
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    name = save_figure(fig, out, "retrain.png")
    w = groups(run)
    return ("## Layer retraining\n\nOne layer at a time is reset to initialisation and retrained alone on the "
            f"{w['clean']}.\n\n"
            + figure("retrain", name, f"one panel per layer, reset and retrained alone on the {w['clean']}: if "
                     f"the red curve ({w['still']}) falls to 0 while the green one ({w['test']}) holds, that layer "
                     f"held the {w['memorised']}; a red curve that stays high means the other layers hold them.")
            + "\n\nAccuracy (%) after retraining:\n\n"
            + accuracy_rows(layers, subsets, acc[:, -1], base, "(final model)"))


ANALYSIS = Analysis(
    name="retrain", order=40, compute=retrain,
    plot=plot_retrain,
    schema=Schema("retrain", "one layer at a time reset and retrained alone on clean data (memloc.retrain)",
                  {**layer_vars(), "epoch": Var(("epoch",), "retraining epoch (0 = just after the reset)"), **SUBSET_VAR},
                  {"accuracy": Var(("layer", "epoch", "subset"), "accuracy while the layer is retrained"),
                   "baseline": Var(("subset",), "accuracy of the model itself")}),
    command=Command(name="retrain", group="localisation", example="memloc retrain RUN",
                    help='reset one layer at a time and retrain only it on clean data',
                    sharded=True,
                    description="Reset one layer at a time to its initialisation, freeze every other parameter and buffer, "
                                "retrain only that layer on the clean training examples (one-cycle schedule) and record clean / "
                                "noisy / test accuracy after every epoch. Writes RUN/results/retrain.h5; an interrupted run "
                                "continues when the same command is run again.",
                    interrupted="finished work is saved (rerun to continue)",
                    overwrite_help="replace an existing retrain.h5 (or an interrupted retrain saved with other settings)",
                    flags={"checkpoint": "--reset-checkpoint"},
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
