"""JTT, just train twice (Liu et al. 2021): upweight what an early model gets wrong, train again.

``memloc.jtt(run, id_epoch=T, upweight=LAMBDA)`` (command: ``python -m memloc jtt RUN``): the
identification model is the parent run at epoch T; its error set is the training examples it
misclassifies (w.r.t. the given labels, eval mode, ``run.h5`` /dynamics/end/correct row T). Fresh
runs with the parent's recipe are trained with the error set's loss weighted by LAMBDA (weights
normalised to mean 1, so the step size matches; in expectation the same as JTT's upsampling by
LAMBDA) beside plain runs (ERM), and both are measured on the groups memloc can name: test, the
worst class on test, clean training examples, noisy ones w.r.t. their given (memorised) and true
labels. Under label noise the error set is mostly the mislabeled examples, so JTT upweights
exactly what should not be learned: expect it to memorise more, not to generalise better.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..scale.distributed import world
from ..core.errors import MemlocError
from ..core.evaluate import evaluate, nanmean, subset_accuracies
from ..core.results import Result
from ..core.run import as_run
from ..core.runtime import check_range, resolve_device
from .children import check_seeds, parent_config, train_children

__all__ = ["GROUPS", "error_set", "group_accuracies", "jtt"]

GROUPS = ("test", "worst_class", "clean", "noisy_given", "noisy_true")


def error_set(run, id_epoch: int) -> np.ndarray:
    """Ids of the training examples the model of epoch ``id_epoch`` misclassifies (given labels)."""
    check_range("id_epoch", id_epoch, low=0, high=run.final_epoch, integer=True)
    correct = run.dynamics("correct", "end")[id_epoch]
    return np.flatnonzero(correct == 0)


def group_accuracies(model, data, *, batch_size: int = 1024) -> np.ndarray:
    """Accuracy on :data:`GROUPS` (NaN for the noisy groups without noise) as a (5,) array."""
    train = evaluate(model, data.train.batches(batch_size))           # one pass over each set
    test = evaluate(model, data.test.batches(batch_size))
    order = np.argsort(train["idx"])
    acc = subset_accuracies(train["correct"][order], train["pred"][order], data.is_noisy, data.label_true)
    labels = data.test.y.cpu().numpy()[np.argsort(test["idx"])]
    correct = test["correct"][np.argsort(test["idx"])]
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    return np.array([nanmean(correct), min(per_class) if per_class else np.nan, acc["clean"], acc["noisy"],
                     acc["noisy_true"]], dtype=np.float64)


def jtt(run, *, id_epoch: int | None = None, upweight: float = 5.0, seeds=(0, 1, 2), jobs: int = 1,
        device="auto", batch_size: int = 1024) -> Result | None:
    """The ``"jtt"`` result: group accuracies of ERM and JTT runs per seed, and the error set.

    ``id_epoch`` (default: 10% of training, the identification model of an early-stopped ERM
    run; Liu et al. tune T on a validation set) and ``upweight`` (lambda_up; Liu et al. use 5-100).
    Under torchrun the fresh runs are split across the processes (:mod:`memloc.actions.children`)
    and rank 0 returns the result, the other ranks None.
    """
    from ..analyses.scores import default_epoch_k
    run = as_run(run)
    base = parent_config(run)
    id_epoch = default_epoch_k(run.final_epoch) if id_epoch is None else id_epoch
    check_range("upweight", upweight, low=0, low_open=True)
    seeds = check_seeds(seeds)
    errors = error_set(run, id_epoch)
    if not len(errors):
        raise MemlocError(f"the model of epoch {id_epoch} misclassifies no training example: nothing to upweight "
                          "(choose an earlier id_epoch)", argument="id_epoch")
    dev = resolve_device(device)
    children = [(f"all-s{s}", {**base, "seed": s}) for s in seeds]
    children += [(f"jtt-T{id_epoch}-up{upweight:g}-s{s}",
                  {**base, "seed": s, "upweight": float(upweight), "upweight_ids": errors.tolist()}) for s in seeds]
    runs = train_children(run, children, jobs=jobs, device=dev, desc="jtt")
    if world()[0] > 0:
        return None             # rank 0 evaluates and returns the result
    data = run.data(dev)
    acc = np.stack([group_accuracies(r.model(device=dev), data, batch_size=batch_size) for r in runs])
    noisy = run.is_noisy
    ds = xr.Dataset({"accuracy": (("variant", "seed", "group"), acc.reshape(2, len(seeds), len(GROUPS))),
                     "error_set": ("error", errors),
                     "error_set_noisy": ((), float(noisy[errors].mean()) if noisy.any() else np.nan)},
                    coords={"variant": ["erm", "jtt"], "seed": seeds, "group": list(GROUPS)})
    config = {"id_epoch": int(id_epoch), "upweight": float(upweight), "seeds": seeds, "jobs": jobs, "device": str(dev)}
    return Result("jtt", ds, config=config)
