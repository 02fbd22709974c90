"""Layer rewinding: put one layer of the final model back to an earlier checkpoint.

``memloc.rewind(run_or_model, data=None, *, checkpoints="all", layers=None)`` (command:
``python -m memloc.rewind RUN``).

For every rewind epoch ``e`` and every layer, the layer's parameters *and* its norm's buffers
(running statistics) are copied from checkpoint ``e`` into a copy of the final model, which is
then evaluated (eval mode) on the subsets of :data:`memloc.evaluate.SUBSETS`: clean training
examples, noisy training examples w.r.t. their given labels (the fraction still memorised) and
w.r.t. their true labels, and the test set. If memorisation lived in one layer, rewinding that
layer would drop the noisy accuracy while keeping the clean and test accuracy.

Returns the ``"rewind"`` result: ``accuracy`` (checkpoint, layer, subset) and ``baseline``
(subset), the unrewound final model's accuracies.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
import xarray as xr

from .errors import MemlocError
from .evaluate import SUBSETS, accuracy_row
from .results import Result
from .runtime import check_range, progress
from .selection import copy_layer, layer_coords, prepare
from .units import Layer

__all__ = ["rewind", "rewind_layers"]


def rewind_layers(model: nn.Module, states: Iterable[dict[str, torch.Tensor]], layers: Sequence[Layer], data, *,
           batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Accuracies of ``model`` with one layer at a time replaced by its tensors in each of ``states``.

    Parameters
    ----------
    model : the final model (not modified; a copy is edited).
    states : R state_dicts (e.g. earlier checkpoints), consumed one at a time.
    layers : the L layers to rewind (a :func:`memloc.selection.merged_layer` rewinds several at once).
    data : :class:`memloc.data.Data` on the model's device.

    Returns
    -------
    accuracy : (R, L, 4) array over :data:`memloc.evaluate.SUBSETS`.
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


def rewind(source, data=None, *, checkpoints="all", layers=None, eval_batch_size: int = 1024,
           device="auto") -> Result:
    """Rewind every layer (or those named in ``layers``) of the final model to each checkpoint.

    ``source``: a :class:`memloc.Run` / run path, or an ``nn.Module`` with ``data`` and
    ``checkpoints={epoch: state_dict}``. Returns the ``"rewind"`` result: ``accuracy``
    (checkpoint, layer, subset) and ``baseline`` (subset).
    """
    check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    if isinstance(source, nn.Module) and not isinstance(checkpoints, dict):
        raise MemlocError("checkpoints must be a mapping {epoch: state_dict} to rewind to when a model is passed",
                          argument="checkpoints")
    p = prepare(source, data, device=device, layers=layers, checkpoints=checkpoints)
    epochs = list(p.states)
    states = (p.state(e) for e in progress(epochs, desc="rewind", unit="checkpoint"))
    acc, baseline = rewind_layers(p.model, states, p.layers, p.data, batch_size=eval_batch_size)
    ds = xr.Dataset({"accuracy": (("checkpoint", "layer", "subset"), acc), "baseline": (("subset",), baseline)},
                    coords={"checkpoint": np.array(epochs, dtype=np.int64), **layer_coords(p.layers),
                            "subset": list(SUBSETS)})
    config = {"checkpoints": epochs, "layers": [l.name for l in p.layers], "eval_batch_size": eval_batch_size,
              "final_epoch": p.run.final_epoch if p.run is not None else None, "device": str(p.device)}
    return Result("rewind", ds, config=config)


if __name__ == "__main__":
    from .commands import module_main
    module_main("rewind")
