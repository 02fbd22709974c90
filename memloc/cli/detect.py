"""``memloc detect RUN``: noise-detection quality of every score (:func:`memloc.detect`)."""
import numpy as np

from ..analyses.detect import detect, format_table
from ..core.run import load

RESULT = "detect"
DEVICE = False
DESCRIPTION = ("Noise-detection quality (AUROC, average precision, precision at the true noise rate) of every "
               "score in RUN/results/scores.h5; writes RUN/results/detect.h5 (the report draws the ROC curves).")
FLAGS = {"names": "--scores"}


def arguments(p):
    p.add_argument("--scores", default="all", help="comma-separated score names to evaluate, or 'all'")


def execute(args):
    return detect(load(args.run), names=args.scores)


def _table(res, values, size, noisy):
    n = res.sizes["score"]
    size, noisy = np.broadcast_to(size, n), np.broadcast_to(noisy, n)
    return {"names": list(res["score"].values), "direction": res["direction"].values, "size": size,
            "noisy": noisy, "base_rate": noisy / np.maximum(size, 1), "values": values}


def summary(res, args):
    text = (f"noise detection ({int(res['noisy'].max())} noisy labels); each score over the examples where it is "
            f"defined:\n" + format_table(_table(res, res["values"].values, res["size"].values, res["noisy"].values)))
    if "common_values" in res:
        rows = res["common_example"].values
        noisy = int(load(args.run).is_noisy[rows].sum())
        text += (f"\n\nevery score on the {len(rows)} examples where all are defined ({noisy} noisy):\n"
                 + format_table(_table(res, res["common_values"].values, len(rows), noisy)))
    return text
