"""Catastrophic forgetting inside one task (Toneva et al. 2019, section 5), with continual-learning protection.

``memloc.forgetting_order(run, *, protect=("none", "ewc", "mas", "lwf"))`` (command: ``python -m
memloc forgetting-order RUN``) splits the run's training set into two parts, trains a fresh model
of the run's architecture on the first part, then on the second, and records the accuracy on both
parts (given labels) after every epoch. Splits (:data:`ORDERS`):

* ``random``: two random halves (A then B);
* ``forgettable_first`` / ``unforgettable_first``: the examples the run forgot at least once (or
  never learned) and an equal number of never-forgotten ones, from the run's forgetting counts
  (:func:`memloc.analyses.scores.forgetting_events`), in either order.

In the second phase the first part can be protected: an EWC or MAS penalty (importance of the
first part at the end of the first phase, divided by its maximum) or LwF distillation from the
first-phase model on the second part's inputs (:mod:`memloc.unlearn`'s losses). Plain SGD with
momentum 0.9 at a constant ``lr`` (one optimiser per phase); batch orders seeded by (seed, epoch).
Runs with example-tied dropout train with those layers in test mode.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import xarray as xr

from ..core.errors import MemlocError
from ..core.evaluate import evaluate
from ..core.optim import make_optimizer
from ..core.results import Result
from ..core.run import as_run
from ..core.runtime import check_choices, check_range, progress, resolve_device
from ..analyses.scores import forgetting_events
from .unlearn import HYPER, distillation_term, finetune, penalty_term, protection_weights

__all__ = ["ORDERS", "PROTECTIONS", "split_parts", "forgetting_order"]

ORDERS = ("random", "forgettable_first", "unforgettable_first")
PROTECTIONS = ("none", "ewc", "mas", "lwf")


def split_parts(run, order: str, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(first part ids, second part ids) of the run's training set for ``order``."""
    n = run.num_train
    rng = np.random.default_rng(seed)
    if order == "random":
        perm = rng.permutation(n)
        return np.sort(perm[:n // 2]), np.sort(perm[n // 2:])
    if order not in ORDERS:
        raise MemlocError(f"orders names an unknown split {order!r}; valid: {', '.join(ORDERS)}", argument="orders")
    counts = forgetting_events(run.dynamics("correct", "presentation")[1:])
    forgettable = np.flatnonzero(counts > 0)
    never = np.flatnonzero(counts == 0)
    k = min(len(forgettable), len(never))
    if k == 0:
        raise MemlocError("the run has no forgettable (or no unforgettable) examples to split by", argument="orders")
    f, u = np.sort(rng.choice(forgettable, k, replace=False)), np.sort(rng.choice(never, k, replace=False))
    return (f, u) if order == "forgettable_first" else (u, f)


def _accuracy(model, part) -> float:
    return float(evaluate(model, part.batches(1024))["correct"].mean())


def forgetting_order(run, *, orders=ORDERS, protect=PROTECTIONS, epochs: int = 10, lr: float = 0.05,
                     lam: dict | None = None, seed: int = 0, batch_size: int = 128, device="auto") -> Result:
    """The ``"forgetting"`` result: ``accuracy`` (order, protect, epoch, part), epoch 0..2E (E = ``epochs``
    per phase; epoch E = the end of the first phase), part = first / second."""
    run = as_run(run)
    protect = check_choices("protect", protect, PROTECTIONS, "protection")
    orders = check_choices("orders", orders, ORDERS, "split")
    check_range("epochs", epochs, low=1, integer=True)
    check_range("lr", lr, low=0, low_open=True)
    check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    check_range("batch_size", batch_size, low=1, integer=True)
    lams = {**HYPER["lam"], **(lam or {})}
    for key, value in lams.items():
        check_range("lam", value, low=0)
    dev = resolve_device(device)
    data = run.data(dev)
    acc = np.zeros((len(orders), len(protect), 2 * epochs + 1, 2))
    sizes = np.zeros((len(orders), 2), dtype=np.int64)
    for i, order in enumerate(progress(orders, desc="forgetting order", unit="order")):
        first_ids, second_ids = split_parts(run, order, seed=seed)
        sizes[i] = len(first_ids), len(second_ids)
        first, second = data.train.subset(first_ids), data.train.subset(second_ids)
        torch.manual_seed(seed)
        model = run.build_model().to(dev)
        if run.info.get("model", {}).get("etd"):     # example-tied dropout: test mode (no example ids needed)
            from ..core.dropout import set_mode
            set_mode(model, "test")
        curve = [(_accuracy(model, first), _accuracy(model, second))]
        opt = make_optimizer(model.parameters(), "sgd", lr=lr, momentum=0.9, weight_decay=0.0)
        for e in range(1, epochs + 1):    # phase 1, shared by every protection; one optimiser (momentum kept)
            finetune(model, first, epochs=1, lr=lr, batch_size=batch_size, seed=seed, optimizer=opt, first_epoch=e)
            curve.append((_accuracy(model, first), _accuracy(model, second)))
        anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
        for j, p in enumerate(protect):
            work = copy.deepcopy(model)
            extra = None
            if p in ("ewc", "mas"):
                extra = penalty_term(anchor, protection_weights(model, first, p), lams[p])
            elif p == "lwf":
                extra = distillation_term(copy.deepcopy(model).eval(), lams["lwf"])
            rows = list(curve)
            torch.manual_seed(seed + 1)   # every protection's phase 2 starts from the same random state
            opt2 = make_optimizer(work.parameters(), "sgd", lr=lr, momentum=0.9, weight_decay=0.0)
            for e in range(epochs + 1, 2 * epochs + 1):      # phase 2
                finetune(work, second, epochs=1, lr=lr, batch_size=batch_size, seed=seed, extra=extra, optimizer=opt2,
                         first_epoch=e)
                rows.append((_accuracy(work, first), _accuracy(work, second)))
            acc[i, j] = rows
    ds = xr.Dataset({"accuracy": (("order", "protect", "epoch", "part"), acc), "size": (("order", "part"), sizes)},
                    coords={"order": orders, "protect": protect, "epoch": np.arange(2 * epochs + 1),
                            "part": ["first", "second"]})
    config = {"orders": orders, "protect": protect, "epochs": epochs, "lr": lr, "lam": lams, "seed": seed,
              "batch_size": batch_size, "device": str(dev)}
    return Result("forgetting", ds, config=config)
