"""``memloc importance RUN``: Fisher (EWC) / MAS parameter importance per layer and unit (:func:`memloc.importance`)."""
import numpy as np

from ..analyses.importance import METHODS, importance
from .runner import layer_table, positive_int

RESULT = "importance"
DESCRIPTION = ("Which parameters matter for which examples: the diagonal Fisher information (EWC) or MAS importance "
               "of the final model on each subset of training examples, per layer (mean per parameter) and per unit "
               "(the unit ids of flip); with a flip result, the overlap between the units flip zeroes for noisy "
               "examples and the top units by noisy importance. Writes RUN/results/importance.h5.")


def arguments(p):
    p.add_argument("--method", default="fisher", choices=METHODS,
                   help="fisher: mean squared per-example gradient of the given label's loss; mas: mean absolute "
                        "per-example gradient of the squared output norm (no labels)")
    p.add_argument("--subsets", default="clean,noisy",
                   help="comma-separated example subsets: clean, noisy, all, flagged (memloc issues' flags), class:C; "
                        "or one ids:1,2,3 subset alone")
    p.add_argument("--batch-size", type=positive_int, default=128, help="examples per vectorised gradient pass")


def execute(args):
    subsets = [args.subsets] if args.subsets.startswith("ids:") else args.subsets
    return importance(args.run, method=args.method, subsets=subsets, batch_size=args.batch_size, device=args.device)


def summary(res, args):
    subsets = [str(s) for s in res["subset"].values]
    text = (f"{res.config['method']} importance (mean per parameter; examples: "
            + ", ".join(f"{s} {int(n)}" for s, n in zip(subsets, res["examples"].values)) + ")\n"
            + layer_table([str(n) for n in res["layer"].values], subsets, res["layer_importance"].values.T, "10.3g"))
    if "flip_overlap" in res:
        text += (f"\noverlap (Jaccard) of the {res.sizes['zeroed']} units flip zeroed for noisy examples with as many "
                 f"top noisy-importance units: {float(res['flip_overlap']):.3f}")
    unit = res["unit_importance"].values
    if np.isfinite(unit).any() and len(subsets) > 1:
        ratio = np.nanmean(unit[1]) / np.nanmean(unit[0])
        text += f"\nmean unit importance {subsets[1]} / {subsets[0]}: {ratio:.2f}"
    return text
