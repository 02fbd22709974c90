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
from ..core.precision import autocast, check_precision, grad_scaler, laid_out
from ..core.results import Result
from ..core.run import as_run
from ..core.runtime import check_choices, check_range, progress, resolve_device
from ..analyses.scores import forgetting_events
from .continual import distillation_term, finetune, penalty_term, protection_weights
from .unlearn import HYPER
from ..core.options import TRAINING_PASSES, add_precision, nonnegative_int, positive_float, positive_int
from ..core.figures import figure, plt, save_figure, table
from ..core.schemas import Schema, Var
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored

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


def _accuracy(model, part, precision: str = "fp32") -> float:
    with autocast(precision, part.y.device):
        return float(evaluate(model, part.batches(1024))["correct"].mean())


@renamed(run="source")
@stored('forgetting')
def forgetting_order(source, *, orders=ORDERS, protect=PROTECTIONS, epochs: int = 10, lr: float = 0.05,
                     lam: dict | None = None, seed: int = 0, batch_size: int = 128, device="auto",
                     precision: str = "fp32") -> Result:
    """The ``"forgetting"`` result: ``accuracy`` (order, protect, epoch, part), epoch 0..2E (E = ``epochs``
    per phase; epoch E = the end of the first phase), part = first / second. ``precision``: every forward
    pass under autocast, fp16 training with a scaled loss (one scaler per phase, beside its optimiser)."""
    run = as_run(source)
    protect = check_choices("protect", protect, PROTECTIONS, "protection")
    orders = check_choices("orders", orders, ORDERS, "split")
    epochs = check_range("epochs", epochs, low=1, integer=True)
    lr = check_range("lr", lr, low=0, low_open=True)
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    batch_size = check_range("batch_size", batch_size, low=1, integer=True)
    check_precision(precision)
    if lam is not None and not isinstance(lam, dict):
        raise MemlocError(f"lam must be a dict {{protection: weight}}, got {type(lam).__name__}", argument="lam")
    unknown = sorted(set(map(str, lam or {})) - set(HYPER["lam"]))
    if unknown:
        raise MemlocError(f"lam has no protection {unknown[0]!r}; its keys: {', '.join(HYPER['lam'])}", argument="lam")
    lams = {**HYPER["lam"], **(lam or {})}
    lams = {key: check_range("lam", value, low=0) for key, value in lams.items()}
    dev = resolve_device(device)
    check_precision(precision, dev)
    data = run.data(dev)
    acc = np.zeros((len(orders), len(protect), 2 * epochs + 1, 2))
    sizes = np.zeros((len(orders), 2), dtype=np.int64)
    for i, order in enumerate(progress(orders, desc="forgetting order", unit="order")):
        first_ids, second_ids = split_parts(run, order, seed=seed)
        sizes[i] = len(first_ids), len(second_ids)
        first, second = data.train.subset(first_ids), data.train.subset(second_ids)
        torch.manual_seed(seed)
        model = laid_out(run.build_model().to(dev), precision, dev)
        if run.info.get("model", {}).get("etd"):     # example-tied dropout: test mode (no example ids needed)
            from ..core.dropout import set_mode
            set_mode(model, "test")
        curve = [(_accuracy(model, first, precision), _accuracy(model, second, precision))]
        opt = make_optimizer(model.parameters(), "sgd", lr=lr, momentum=0.9, weight_decay=0.0)
        scaler = grad_scaler(precision, dev)
        for e in range(1, epochs + 1):    # phase 1, shared by every protection; one optimiser (momentum kept)
            finetune(model, first, epochs=1, lr=lr, batch_size=batch_size, seed=seed, optimizer=opt, first_epoch=e,
                     precision=precision, scaler=scaler)
            curve.append((_accuracy(model, first, precision), _accuracy(model, second, precision)))
        anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
        for j, p in enumerate(protect):
            work = copy.deepcopy(model)
            extra = None
            if p in ("ewc", "mas"):
                extra = penalty_term(anchor, protection_weights(model, first, p, precision=precision), lams[p])
            elif p == "lwf":
                extra = distillation_term(copy.deepcopy(model).eval(), lams["lwf"])
            rows = list(curve)
            torch.manual_seed(seed + 1)   # every protection's phase 2 starts from the same random state
            opt2 = make_optimizer(work.parameters(), "sgd", lr=lr, momentum=0.9, weight_decay=0.0)
            scaler2 = grad_scaler(precision, dev)
            for e in range(epochs + 1, 2 * epochs + 1):      # phase 2
                finetune(work, second, epochs=1, lr=lr, batch_size=batch_size, seed=seed, extra=extra, optimizer=opt2,
                         first_epoch=e, precision=precision, scaler=scaler2)
                rows.append((_accuracy(work, first, precision), _accuracy(work, second, precision)))
            acc[i, j] = rows
    ds = xr.Dataset({"accuracy": (("order", "protect", "epoch", "part"), acc), "size": (("order", "part"), sizes)},
                    coords={"order": orders, "protect": protect, "epoch": np.arange(2 * epochs + 1),
                            "part": ["first", "second"]})
    config = {"orders": orders, "protect": protect, "epochs": epochs, "lr": lr, "lam": lams, "seed": seed,
              "batch_size": batch_size, "device": str(dev), "precision": precision}
    return Result("forgetting", ds, config=config)


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--orders", default=",".join(ORDERS), help=f"comma-separated splits: {', '.join(ORDERS)}")
    p.add_argument("--protect", default=",".join(PROTECTIONS), help=f"comma-separated protections: {', '.join(PROTECTIONS)}")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs of each phase")
    p.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (SGD, momentum 0.9, constant)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split, the initialisation and the batch order")
    add_precision(p, what=TRAINING_PASSES)


def _cli_execute(args):
    return forgetting_order(args.run, orders=args.orders, protect=args.protect, epochs=args.epochs, lr=args.lr,
                            seed=args.seed, device=args.device, precision=args.precision)


def _cli_summary(res, args):
    e = res.sizes["epoch"] // 2
    lines = [f"accuracy on the first part after phase 1 (epoch {e}) -> after phase 2 (epoch {2 * e}); second part after phase 2:"]
    for o in res["order"].values:
        for p in res["protect"].values:
            a = res["accuracy"].sel(order=o, protect=p)
            lines.append(f"{str(o):<22} {str(p):<5} first {float(a.sel(epoch=e, part='first')):.3f} -> "
                         f"{float(a.sel(epoch=2 * e, part='first')):.3f}   second {float(a.sel(epoch=2 * e, part='second')):.3f}")
    return "\n".join(lines)


def plot_forgetting(res, out, run=None) -> str:
    """Accuracy on both parts over the two phases, one panel per order, one colour per protection."""
    orders, protect = [str(o) for o in res["order"].values], [str(p) for p in res["protect"].values]
    e = res.sizes["epoch"] // 2
    fig, axes = plt.subplots(1, len(orders), figsize=(4.4 * len(orders), 3.4), squeeze=False, sharey=True)
    for ax, o in zip(axes[0], orders):
        for k, p in enumerate(protect):
            a = res["accuracy"].sel(order=o, protect=p)
            ax.plot(res["epoch"].values, 100 * a.sel(part="first").values, color=f"C{k}", label=f"first part, {p}")
            ax.plot(res["epoch"].values, 100 * a.sel(part="second").values, color=f"C{k}", ls=":")
        ax.axvline(e, color="gray", lw=1)
        ax.set(xlabel="epoch (phase 1 | phase 2)", title=o)
    axes[0, 0].set_ylabel("accuracy (%) (solid: first part, dotted: second)")
    axes[0, -1].legend(fontsize=7, loc="lower left")
    name = save_figure(fig, out, "forgetting.png")
    rows = [[o, p, 100 * float(res["accuracy"].sel(order=o, protect=p, epoch=e, part="first")),
             100 * float(res["accuracy"].sel(order=o, protect=p, epoch=2 * e, part="first")),
             100 * float(res["accuracy"].sel(order=o, protect=p, epoch=2 * e, part="second"))]
            for o in orders for p in protect]
    return ("## Within-task forgetting\n\nA fresh model trained on the first part, then on the second (Toneva et al. "
            "2019, section 5).\n\n"
            + figure("forgetting", name, "one panel per order of the two parts; solid lines, accuracy on the first "
                     "part, dotted on the second, one colour per protection; after the vertical line the model trains "
                     "on the second part, and the solid line falling is the first part being forgotten.") + "\n\n"
            + table(["order", "protection", "first, end of phase 1", "first, end", "second, end"], rows, digits=1))


ANALYSIS = Analysis(
    name="forgetting", order=140, compute=forgetting_order,
    plot=plot_forgetting,
    schema=Schema("forgetting", "within-task forgetting: train on one part, then the other (memloc.forgetting_order)",
                  {"order": Var(("order",), "random, forgettable_first, unforgettable_first"),
                   "protect": Var(("protect",), "none, ewc, mas, lwf: how the first part is protected in the second phase"),
                   "epoch": Var(("epoch",), "0 = initialisation, 1..E first phase, E+1..2E second phase"),
                   "part": Var(("part",), "first, second")},
                  {"accuracy": Var(("order", "protect", "epoch", "part"), "accuracy on the part (given labels)"),
                   "size": Var(("order", "part"), "examples in the part")}),
    command=Command(name="forgetting-order", group="acting", example="memloc forgetting-order RUN",
                    help='train on one part then the other: within-task forgetting, with EWC / MAS / LwF protection',
                    description="Catastrophic forgetting inside one task (Toneva et al. 2019, section 5): a fresh model of the run's "
                                "architecture trained on one part of the training set, then on the other (random halves; forgettable "
                                "then unforgettable examples by the run's forgetting counts, or the reverse), with the first part "
                                "unprotected or protected by EWC / MAS penalties or LwF distillation. Accuracy on both parts after every "
                                "epoch. Writes RUN/results/forgetting.h5.",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
