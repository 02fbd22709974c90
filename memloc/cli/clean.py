"""``memloc clean RUN``: drop or relabel the flagged examples, retrain, compare with cleanlab (:func:`memloc.clean`)."""
import numpy as np

from ..actions.clean import clean
from ..analyses.label_issues import COMBINED
from ..analyses.scores import SCORES
from .runner import add_experiment, number, seed_table

RESULT = "clean"
SHARDED = True     # torchrun --nproc-per-node K -m memloc clean RUN: the fresh runs split K ways (rank r trains every K-th)
DESCRIPTION = ("Flag label issues without ground truth (memloc issues), drop them (or --relabel them with the early "
               "model's prediction), train fresh runs with the run's recipe and compare test accuracy with training "
               "on all the data; cleanlab on K-fold out-of-sample probabilities of the same recipe is the baseline. "
               "Writes RUN/results/clean.h5; fresh runs live under RUN/children.")
INTERRUPTED = "finished runs under RUN/children are kept; rerun the same command to go on"


def arguments(p):
    p.add_argument("--by", default="combined",
                   help=f"ranking of the flags: combined ({', '.join(COMBINED)}) or a score: "
                        f"{', '.join(n for n in SCORES if n != 'neuron_count')}")
    p.add_argument("--relabel", action="store_true",
                   help="give flagged examples the predicted label instead of dropping them")
    p.add_argument("--no-cleanlab", dest="baseline", action="store_false",
                   help="skip the cleanlab baseline (it costs --folds extra trainings)")
    p.add_argument("--folds", type=number(int, 2), default=5, help="cross-validation folds of the cleanlab baseline")
    add_experiment(p)


def execute(args):
    return clean(args.run, by=args.by, relabel=args.relabel, seeds=args.seeds, baseline=args.baseline,
                 folds=args.folds, jobs=args.jobs, device=args.device)


def summary(res, args):
    lines = [f"test accuracy (mean +- s.e. over {res.sizes['seed']} seed(s); flagged examples "
             f"{'relabelled' if res.config['relabel'] else 'dropped'}):", seed_table(res, dim="flags")]
    for m in res["flags"].values[1:]:
        r = res.sel(flags=m)
        extra = ""
        if np.isfinite(float(r["precision"])):
            extra = (f", precision {float(r['precision']):.3f}, recall {float(r['recall']):.3f}, noise left "
                     f"{float(r['noise_left']):.4f} (was {float(res['noise_left'].sel(flags='all')):.4f})")
        lines.append(f"{m}: {int(r['flagged'])} flagged{extra}")
    return "\n".join(lines)
