"""Layer rewinding: put one layer of the final model back to an earlier checkpoint.

``python -m memloc.rewind RUN [--epochs all] [--layers ...]``

For every rewind epoch ``e`` and every layer, the layer's parameters *and* its norm's buffers
(running statistics) are copied from checkpoint ``e`` into a copy of the final model, which is
then evaluated (eval mode) on the subsets of :data:`memloc.run.SUBSETS`: clean training
examples, noisy training examples w.r.t. their given labels (the fraction still memorised) and
w.r.t. their true labels, and the test set. If memorisation lived in one layer, rewinding that
layer would drop the noisy accuracy while keeping the clean and test accuracy.

Writes ``RUN/results/rewind.h5``: ``/epochs`` (R,) rewind epochs, ``/layers/{names,kinds,numel}``
(L,), ``/subsets/names`` (4,), ``/accuracy`` (R, L, 4) dims ``[rewind_epoch, layer, subset]``,
``/baseline`` (4,) the unrewound final model's accuracies.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import cli
from .layers import (accuracy_datasets, accuracy_row, add_layer_args, copy_layer, describe,
                     setup, table, write_results)
from .run import SUBSETS
from .units import Layer

__all__ = ["rewind", "parse_args", "main"]


def rewind(model: nn.Module, states: Iterable[dict[str, torch.Tensor]], layers: Sequence[Layer], data, *,
           batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Accuracies of ``model`` with one layer at a time replaced by its tensors in each of ``states``.

    Parameters
    ----------
    model : the final model (not modified; a copy is edited).
    states : R state_dicts (e.g. earlier checkpoints), consumed one at a time.
    layers : the L layers to rewind (a :func:`memloc.layers.merged_layer` rewinds several at once).
    data : :class:`memloc.data.Data` on the model's device.

    Returns
    -------
    accuracy : (R, L, 4) array over :data:`memloc.run.SUBSETS`.
    baseline : (4,) accuracies of ``model`` itself.
    """
    work = copy.deepcopy(model).eval()
    final = {k: v.detach().clone() for k, v in work.state_dict().items()}
    baseline = accuracy_row(work, data, batch_size=batch_size)
    rows = []
    for state in states:
        row = []
        for layer in layers:
            copy_layer(work, state, layer)
            row.append(accuracy_row(work, data, batch_size=batch_size))
            copy_layer(work, final, layer)
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(layers), len(SUBSETS)), baseline


def parse_args(argv=None):
    p = cli.parser("memloc.rewind", "Rewind one layer at a time of the final model to an earlier "
                   "checkpoint (parameters and norm buffers) and record accuracy on clean train, "
                   "noisy train (given and true labels) and test. Writes RUN/results/rewind.h5.")
    p.add_argument("run", help="run directory (from python -m memloc.train)")
    add_layer_args(p, epochs_help="checkpoint epochs to rewind to")
    p.add_argument("--batch-size", type=int, default=1024, help="evaluation batch size")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors("memloc.rewind"):
        cli.check_positive(args, "batch_size")
        s = setup(args.run, device=args.device, layers=args.layers, epochs=args.epochs)
        epochs = s.epochs
        model = s.run.model(None, s.device)
        states = (s.run.checkpoint(e) for e in cli.progress(epochs, desc="rewind", unit="epoch"))
        acc, baseline = rewind(model, states, s.layers, s.data, batch_size=args.batch_size)
        config = {"epochs": epochs, "final_epoch": s.run.final_epoch, "batch_size": args.batch_size}
        path = write_results(s, "rewind", config, argv,
                             {"epochs": (np.asarray(epochs, np.int64), ["rewind_epoch"]),
                              **accuracy_datasets(acc, ["rewind_epoch", "layer", "subset"], baseline)})
        print(f"{path}: {len(epochs)} rewind epochs x {len(s.layers)} layers; final model "
              f"(epoch {s.run.final_epoch}): {describe(baseline)}")
        print(f"rewound to epoch {epochs[0]}:\n" + table(s.layers, SUBSETS, acc[0]))
    return acc, baseline


if __name__ == "__main__":
    main()
