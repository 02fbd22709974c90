"""Layer retraining: reset one layer to its initialisation and retrain only it on clean data.

``python -m memloc.retrain RUN [--layers ...] [--epochs-retrain 20] [--lr 0.1]``

For every layer, a copy of the final model gets that layer's tensors (parameters and its norm's
buffers) from checkpoint ``--reset-epoch`` (default 0, the initialisation); every other parameter
is frozen and every other module stays in eval mode, so no other parameter *or buffer* (e.g.
another layer's BatchNorm running statistics) changes. Only the layer is trained, on the clean
training examples, with SGD (momentum, weight decay) and a one-cycle schedule (learning rate
rising linearly from 0 to ``--lr`` at the middle of training, then back to 0). After every epoch
(and before the first) the model is evaluated on the subsets of :data:`memloc.run.SUBSETS`. A
layer that clean data alone can bring back to high clean and test accuracy, while the noisy
labels stay unlearned, is not needed for memorisation. Seeded and deterministic.

Writes ``RUN/results/retrain.h5``: ``/layers/{names,kinds,numel}`` (L,), ``/epochs`` (E+1,) =
0..E, ``/subsets/names`` (4,), ``/accuracy`` (L, E+1, 4) dims ``[layer, epoch, subset]``,
``/baseline`` (4,) the final model's accuracies.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cli
from .layers import (accuracy_datasets, accuracy_row, add_layer_args, copy_layer, describe,
                     setup, table, write_results)
from .run import SUBSETS
from .train import epoch_seed, lr_factor
from .units import Layer

__all__ = ["HYPER", "retrain_layer", "retrain", "parse_args", "main"]

# Retraining hyper-parameters (the paper's: 20 epochs, one-cycle peaking at lr 0.1 mid-way).
HYPER = dict(
    epochs=20,           # retraining epochs
    lr=0.1,              # peak learning rate, reached half-way
    batch_size=128,
    momentum=0.9,        # SGD with Nesterov momentum
    weight_decay=5e-4,
    seed=0,              # batch order (and any randomness of the layer's own modules)
)


def retrain_layer(model: nn.Module, init: dict[str, torch.Tensor], layer: Layer, data, *,
                  epochs: int = HYPER["epochs"], lr: float = HYPER["lr"],
                  batch_size: int = HYPER["batch_size"], momentum: float = HYPER["momentum"],
                  weight_decay: float = HYPER["weight_decay"], seed: int = HYPER["seed"],
                  eval_batch_size: int = 1024) -> tuple[np.ndarray, nn.Module]:
    """Reset ``layer`` of a copy of ``model`` to ``init`` and retrain only it on ``data.clean_train``.

    Parameters
    ----------
    model : the trained model (not modified).
    init : a state_dict holding the layer's reset tensors (e.g. the epoch-0 checkpoint).
    layer : the layer to reset and retrain (its modules run in train mode, all others in eval).
    data : :class:`memloc.data.Data` on the model's device.

    Returns
    -------
    curve : (epochs + 1, 4) accuracies over :data:`memloc.run.SUBSETS`; row 0 = just after the reset.
    model : the retrained copy.
    """
    work = copy.deepcopy(model).eval()
    copy_layer(work, init, layer)
    for p in work.parameters():
        p.requires_grad_(False)
    params = dict(work.named_parameters())
    trainable = [params[k].requires_grad_(True) for k in layer.params]
    modules = dict(work.named_modules())
    own = [modules[m] for m in layer.modules if m in modules]
    clean = data.clean_train
    steps = max(1, -(-len(clean) // batch_size)) * epochs
    curve = [accuracy_row(work, data, batch_size=eval_batch_size)]
    if not trainable:  # e.g. a norm without affine parameters: nothing to retrain
        return np.asarray(curve * (epochs + 1), dtype=np.float64), work
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, "onecycle", 0.5))
    device = trainable[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            for m in own:
                m.training = True  # the layer's own modules only (not their children)
            gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            for x, y, _ in clean.batches(batch_size, shuffle=True, generator=gen):
                if len(y) < 2:  # a single example breaks batch-statistics norms
                    continue
                loss = F.cross_entropy(work(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            work.eval()
            curve.append(accuracy_row(work, data, batch_size=eval_batch_size))
    return np.asarray(curve, dtype=np.float64), work


def retrain(model: nn.Module, init: dict[str, torch.Tensor], layers: Sequence[Layer], data,
            **options) -> np.ndarray:
    """:func:`retrain_layer` for every layer -> (L, epochs + 1, 4) accuracies."""
    curves = [retrain_layer(model, init, l, data, **options)[0]
              for l in cli.progress(layers, desc="retrain", unit="layer")]
    if not curves:
        return np.zeros((0, options.get("epochs", HYPER["epochs"]) + 1, len(SUBSETS)))
    return np.stack(curves)


def parse_args(argv=None):
    p = cli.parser("memloc.retrain", "Reset one layer at a time to its initialisation, freeze every "
                   "other parameter and buffer, retrain only that layer on the clean training "
                   "examples (one-cycle schedule) and record clean / noisy / test accuracy after "
                   "every epoch. Writes RUN/results/retrain.h5.")
    p.add_argument("run", help="run directory (from python -m memloc.train)")
    add_layer_args(p)
    p.add_argument("--reset-epoch", type=int, default=0,
                   help="checkpoint whose tensors the layer is reset to (0 = initialisation)")
    p.add_argument("--epochs-retrain", type=int, default=HYPER["epochs"], help="retraining epochs")
    p.add_argument("--lr", type=float, default=HYPER["lr"],
                   help="peak learning rate of the one-cycle schedule (reached half-way)")
    p.add_argument("--batch-size", type=int, default=HYPER["batch_size"], help="retraining batch size")
    p.add_argument("--momentum", type=float, default=HYPER["momentum"], help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=float, default=HYPER["weight_decay"],
                   help="weight decay of the retrained layer")
    p.add_argument("--seed", type=int, default=HYPER["seed"], help="seed of the batch order")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors("memloc.retrain"):
        cli.check_positive(args, "epochs_retrain", "batch_size")
        if not args.lr > 0:
            raise cli.UserError(f"--lr must be positive, got {args.lr}")
        s = setup(args.run, device=args.device, layers=args.layers)
        init = s.run.checkpoint(args.reset_epoch)
        model = s.run.model(None, s.device)
        hyper = dict(epochs=args.epochs_retrain, lr=args.lr, batch_size=args.batch_size,
                     momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed)
        acc = retrain(model, init, s.layers, s.data, **hyper)
        baseline = accuracy_row(model, s.data)
        config = {**hyper, "reset_epoch": args.reset_epoch, "final_epoch": s.run.final_epoch,
                  "schedule": "onecycle, peak at 0.5", "train_subset": "clean"}
        path = write_results(s, "retrain", config, argv,
                             {"epochs": (np.arange(args.epochs_retrain + 1), ["epoch"]),
                              **accuracy_datasets(acc, ["layer", "epoch", "subset"], baseline)})
        print(f"{path}: {len(s.layers)} layers x {args.epochs_retrain} epochs; "
              f"final model: {describe(baseline)}")
        print(f"after retraining (reset to epoch {args.reset_epoch}):\n"
              + table(s.layers, SUBSETS, acc[:, -1]))
    return acc


if __name__ == "__main__":
    main()
