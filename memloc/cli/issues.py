"""``memloc issues RUN``: label issues without ground truth (:func:`memloc.find_label_issues`)."""
import numpy as np

from ..analyses.label_issues import COMBINED, find_label_issues, flag_quality, to_csv
from ..core.run import load
from ..analyses.scores import SCORES
from .runner import check_writable, nonnegative_int, number, positive_int

RESULT = "issues"
DESCRIPTION = ("Rank every training example by how likely its label is wrong and flag the suspects, without ground "
               "truth: the number flagged is the noise rate estimated by confident learning's calibrated confident "
               "joint on the early-epoch (epoch k) predictions. Writes RUN/results/issues.h5 (and --out CSV).")
FLAGS = {"runs": "--also", "csv": "--out"}


def arguments(p):
    p.add_argument("--by", default="combined",
                   help=f"ranking: combined (mean rank percentile of {', '.join(COMBINED)}) or one score: "
                        f"{', '.join(n for n in SCORES if n != 'neuron_count')}")
    p.add_argument("--also", nargs="+", default=[], metavar="RUN2",
                   help="more runs of the same data (other seeds): scores and probabilities averaged over all runs")
    p.add_argument("--rate", type=number(float, 0, 1, high_open=True), default=None,
                   help="flag this fraction instead of the estimated noise rate")
    p.add_argument("--checkpoint-k", type=nonnegative_int, default=None,
                   help="epoch of the predictions and of EL2N (default: 10%% of training, at least 1)")
    p.add_argument("--out", dest="csv", default=None, metavar="CSV",
                   help="also write the ranked table (one row per example, most suspicious first) as CSV")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="examples per forward pass")


def execute(args):
    if args.csv:
        check_writable(args.csv)
    return find_label_issues([args.run, *args.also], by=args.by, rate=args.rate, checkpoint_k=args.checkpoint_k,
                             device=args.device, batch_size=args.batch_size)


def after_save(res, args):
    if args.csv:
        to_csv(res, args.csv)


def summary(res, args):
    n, flagged = res.sizes["example"], int(res["flagged"].sum())
    rate = float(res["rate_estimate"])
    lines = [f"estimated noise rate {rate:.4f} ({res.config['rate_method']}, epoch {res.config['checkpoint_k']}"
             f"{', %d runs' % len(res.config['runs']) if len(res.config['runs']) > 1 else ''}): "
             f"{flagged} of {n} examples flagged (ranked by {res.config['by']})"]
    run = load(args.run)
    if run.is_noisy.any():
        q = flag_quality(res["flagged"].values, run.is_noisy)
        lines.append(f"against the run's known noise ({int(run.is_noisy.sum())} = {run.is_noisy.mean():.4f}): "
                     f"precision {q['precision']:.3f}, recall {q['recall']:.3f}")
    top = np.argsort(res["rank"].values)[:5]
    lines.append("most suspicious: " + ", ".join(
        f"#{i} (given {int(res['label_given'][i])}, predicted {int(res['label_predicted'][i])})" for i in top))
    if args.csv:
        lines.append(f"wrote {args.csv}")
    return "\n".join(lines)
