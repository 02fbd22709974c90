"""``memloc forgetting-order RUN``: within-task forgetting, with and without protection (:func:`memloc.forgetting_order`)."""
from ..actions.forgetting import ORDERS, PROTECTIONS, forgetting_order
from .runner import nonnegative_int, positive_float, positive_int

RESULT = "forgetting"
DESCRIPTION = ("Catastrophic forgetting inside one task (Toneva et al. 2019, section 5): a fresh model of the run's "
               "architecture trained on one part of the training set, then on the other (random halves; forgettable "
               "then unforgettable examples by the run's forgetting counts, or the reverse), with the first part "
               "unprotected or protected by EWC / MAS penalties or LwF distillation. Accuracy on both parts after every "
               "epoch. Writes RUN/results/forgetting.h5.")


def arguments(p):
    p.add_argument("--orders", default=",".join(ORDERS), help=f"comma-separated splits: {', '.join(ORDERS)}")
    p.add_argument("--protect", default=",".join(PROTECTIONS), help=f"comma-separated protections: {', '.join(PROTECTIONS)}")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs of each phase")
    p.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (SGD, momentum 0.9, constant)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split, the initialisation and the batch order")


def execute(args):
    return forgetting_order(args.run, orders=args.orders, protect=args.protect, epochs=args.epochs, lr=args.lr,
                            seed=args.seed, device=args.device)


def summary(res, args):
    e = res.sizes["epoch"] // 2
    lines = [f"accuracy on the first part after phase 1 (epoch {e}) -> after phase 2 (epoch {2 * e}); second part after phase 2:"]
    for o in res["order"].values:
        for p in res["protect"].values:
            a = res["accuracy"].sel(order=o, protect=p)
            lines.append(f"{str(o):<22} {str(p):<5} first {float(a.sel(epoch=e, part='first')):.3f} -> "
                         f"{float(a.sel(epoch=2 * e, part='first')):.3f}   second {float(a.sel(epoch=2 * e, part='second')):.3f}")
    return "\n".join(lines)
