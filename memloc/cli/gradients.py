"""``memloc gradients RUN``: per-layer gradient accounting (:func:`memloc.gradients`)."""
import numpy as np

from ..analyses.gradients import BN_MODES, gradients
from .runner import add_checkpoints, add_layers, layer_table, positive_int

RESULT = "gradients"
SHARDED = True     # torchrun --nproc-per-node K -m memloc gradients RUN: the checkpoints split K ways
INTERRUPTED = "finished work is saved (rerun to continue)"
OVERWRITE_HELP = "replace an existing gradients.h5 (or an interrupted gradients run saved with other settings)"
DESCRIPTION = ("Per-layer gradient norms of the mean clean, noisy and total training loss (divided by "
               "sqrt(#params of the layer)) and the cosine between the clean and noisy gradients, at every "
               "chosen checkpoint. Writes RUN/results/gradients.h5.")


def arguments(p):
    add_checkpoints(p, "checkpoints to analyse")
    add_layers(p)
    p.add_argument("--bn-mode", choices=BN_MODES, default="eval",
                   help="norm layers use running statistics (eval) or batch statistics (train; the "
                        "checkpoints' running statistics are not changed)")
    p.add_argument("--batch-size", type=positive_int, default=1024,
                   help="examples per forward pass (with --bn-mode train also the statistics batch)")


def execute(args):
    return gradients(args.run, checkpoints=args.checkpoints, layers=args.layers, bn_mode=args.bn_mode,
                     batch_size=args.batch_size, device=args.device, resume_dir="auto", overwrite=args.overwrite)


def summary(res, args):
    epochs = res["checkpoint"].values
    shown = epochs >= 2 if epochs.max() >= 2 else np.ones(len(epochs), bool)
    with np.errstate(all="ignore"):
        means = np.concatenate([np.nanmean(res["norm"].values[shown], axis=0),
                                np.nanmean(res["cosine"].values[shown], axis=0)[:, None]], axis=1)
    label = ", ".join(map(str, epochs[shown])) if shown.sum() < 6 else ">= 2"
    return (f"{len(epochs)} checkpoints x {res.sizes['layer']} layers; means over epochs {label}:\n"
            + layer_table(res["layer"].values, ["norm_clean", "norm_noisy", "norm_all", "cosine"], means, fmt="10.3g"))
