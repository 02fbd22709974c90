"""``memloc retrain RUN``: layer retraining on clean data (:func:`memloc.retrain`)."""
from ..analyses.retrain import HYPER, retrain
from .runner import (add_eval_batch_size, add_layers, add_precision, describe, layer_table, nonnegative_float,
                     nonnegative_int, number, positive_float, positive_int)

RESULT = "retrain"
SHARDED = True     # torchrun --nproc-per-node K -m memloc retrain RUN: the layers split K ways
DESCRIPTION = ("Reset one layer at a time to its initialisation, freeze every other parameter and buffer, "
               "retrain only that layer on the clean training examples (one-cycle schedule) and record clean / "
               "noisy / test accuracy after every epoch. Writes RUN/results/retrain.h5; an interrupted run "
               "continues when the same command is run again.")
INTERRUPTED = "finished work is saved (rerun to continue)"
OVERWRITE_HELP = "replace an existing retrain.h5 (or an interrupted retrain saved with other settings)"
FLAGS = {"reset_to": "--reset-checkpoint"}


def arguments(p):
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
    add_eval_batch_size(p)
    add_precision(p)


def execute(args):
    return retrain(args.run, layers=args.layers, reset_to=args.reset_checkpoint, epochs=args.epochs, lr=args.lr,
                   batch_size=args.batch_size, momentum=args.momentum, weight_decay=args.weight_decay,
                   seed=args.seed, eval_batch_size=args.eval_batch_size, device=args.device,
                   resume_dir="auto", overwrite=args.overwrite, precision=args.precision)


def summary(res, args):
    subsets = list(res["subset"].values)
    return (f"{res.sizes['layer']} layers x {args.epochs} epochs; final model: "
            f"{describe(res['baseline'].values, subsets)}\n"
            f"after retraining (reset to checkpoint {args.reset_checkpoint}):\n"
            + layer_table(res["layer"].values, subsets, res["accuracy"].isel(epoch=-1).values))
