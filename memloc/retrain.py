"""Layer retraining: reset one layer to its initialisation and retrain only it on clean data.

``memloc.retrain(run_or_model, data=None, *, layers=None, epochs=20, lr=0.1, reset_to=0)``
(command: ``python -m memloc retrain RUN``).

For every layer, a copy of the final model gets that layer's tensors (parameters and its norm's
buffers) from checkpoint ``reset_to`` (default 0, the initialisation); every other parameter
is frozen and every other module stays in eval mode, so no other parameter *or buffer* (e.g.
another layer's BatchNorm running statistics) changes. Only the layer is trained, on the clean
training examples, with SGD (momentum, weight decay) and a one-cycle schedule (learning rate
rising linearly from 0 to ``--lr`` at the middle of training, then back to 0). After every epoch
(and before the first) the model is evaluated on the subsets of :data:`memloc.evaluate.SUBSETS`. A
layer that clean data alone can bring back to high clean and test accuracy, while the noisy
labels stay unlearned, is not needed for memorisation. Seeded and deterministic.

Returns the ``"retrain"`` result: ``accuracy`` (layer, epoch, subset) with epoch = 0..E and
``baseline`` (subset), the final model's accuracies.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
import xarray as xr

from .errors import MemlocError
from .evaluate import SUBSETS, accuracy_row
from .optim import epoch_seed, make_optimizer, make_schedule
from .results import Result
from .runtime import check_range, progress
from .selection import copy_layer, layer_coords, prepare
from .units import Layer

__all__ = ["HYPER", "retrain_layer", "retrain"]

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
    curve : (epochs + 1, 4) accuracies over :data:`memloc.evaluate.SUBSETS`; row 0 = just after the reset.
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
    opt = make_optimizer(trainable, "sgd", lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = make_schedule(opt, steps, "onecycle", 0.5)
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


def retrain(source, data=None, *, layers=None, reset_to=0, epochs: int = HYPER["epochs"],
            lr: float = HYPER["lr"], batch_size: int = HYPER["batch_size"], momentum: float = HYPER["momentum"],
            weight_decay: float = HYPER["weight_decay"], seed: int = HYPER["seed"],
            eval_batch_size: int = 1024, device="auto") -> Result:
    """:func:`retrain_layer` for every layer (or those named in ``layers``) of the final model.

    ``source``: a :class:`memloc.Run` / run path (``reset_to``: a checkpoint epoch), or an
    ``nn.Module`` with ``data`` (``reset_to``: a state_dict holding the layers' reset tensors).
    Returns the ``"retrain"`` result: ``accuracy`` (layer, epoch, subset) and ``baseline`` (subset).
    """
    check_range("epochs", epochs, low=1, integer=True)
    check_range("batch_size", batch_size, low=1, integer=True)
    check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    check_range("momentum", momentum, low=0, high=1, high_open=True)
    check_range("weight_decay", weight_decay, low=0)
    check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    check_range("lr", lr, low=0)
    if not lr > 0:
        raise MemlocError(f"lr must be positive, got {lr}", argument="lr")
    if isinstance(source, nn.Module) and not isinstance(reset_to, dict):
        raise MemlocError("reset_to must be a state_dict when a model is passed instead of a run")
    p = prepare(source, data, device=device, layers=layers, checkpoints=None if isinstance(source, nn.Module) else "final")
    init = reset_to if isinstance(reset_to, dict) else p.run.checkpoint(reset_to)
    hyper = dict(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, seed=seed)
    curves = [retrain_layer(p.model, init, l, p.data, eval_batch_size=eval_batch_size, **hyper)[0]
              for l in progress(p.layers, desc="retrain", unit="layer")]
    acc = np.stack(curves) if curves else np.zeros((0, epochs + 1, len(SUBSETS)))
    baseline = accuracy_row(p.model, p.data, batch_size=eval_batch_size)
    ds = xr.Dataset({"accuracy": (("layer", "epoch", "subset"), acc), "baseline": (("subset",), baseline)},
                    coords={**layer_coords(p.layers), "epoch": np.arange(epochs + 1), "subset": list(SUBSETS)})
    config = {**hyper, "reset_to": reset_to if not isinstance(reset_to, dict) else "state_dict",
              "layers": [l.name for l in p.layers], "eval_batch_size": eval_batch_size, "device": str(p.device),
              "final_epoch": p.run.final_epoch if p.run is not None else None,
              "schedule": "onecycle, peak at 0.5", "train_subset": "clean"}
    return Result("retrain", ds, config=config)


if __name__ == "__main__":
    from .commands import module_main
    module_main("retrain")
