"""``memloc dropout RUN``: an example-tied-dropout run per mode (:func:`memloc.evaluate_dropout`)."""
import numpy as np

from ..analyses.etd import evaluate_dropout
from .runner import add_eval_batch_size, nonnegative_int

RESULT = "dropout"
DESCRIPTION = ("Evaluate a run trained with example-tied dropout (--etd-after) in train mode (each training example "
               "through its own mask: what was memorised), test mode (memorisation units scaled by p_mem) and drop "
               "mode (memorisation units zeroed, generalisation units rescaled): accuracy on clean training "
               "examples, noisy ones (given and true labels) and the test set. Writes RUN/results/dropout.h5.")


def arguments(p):
    p.add_argument("--checkpoint", type=nonnegative_int, default=None,
                   help="checkpoint epoch to evaluate (default: final)")
    add_eval_batch_size(p)
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="before evaluating test and drop mode, re-estimate the BatchNorm running statistics "
                        "in that mode from the training inputs (training collected them under the "
                        "per-example masks; recommended for models with BatchNorm, e.g. resnet9)")


def execute(args):
    return evaluate_dropout(args.run, checkpoint=args.checkpoint, eval_batch_size=args.eval_batch_size,
                            recalibrate_bn=args.recalibrate_bn, device=args.device)


def summary(res, args):
    subsets = list(res["subset"].values)
    lines = [f"{args.run} (checkpoint {res.config['checkpoint']}; {res.sizes['layer']} dropout layers: "
             f"{', '.join(res['layer'].values)})", f"{'mode':<6}" + "".join(f"{s:>12}" for s in subsets)]
    for mode, row in zip(res["mode"].values, res["accuracy"].values):
        lines.append(f"{mode:<6}" + "".join(f"{'-':>12}" if np.isnan(v) else f"{100 * v:>11.2f}%" for v in row))
    return "\n".join(lines)
