"""``memloc prune RUN``: data pruning by score vs random (:func:`memloc.prune`)."""
import numpy as np

from ..actions.prune import prune
from ..actions.prune import MODES
from ..analyses.scores import SCORES
from .runner import add_experiment, mean_se, nonnegative_int, number

RESULT = "prune"
SHARDED = True     # torchrun --nproc-per-node K -m memloc prune RUN: the fresh runs split K ways (rank r trains every K-th)
DESCRIPTION = ("Keep a fraction of the training set chosen by each score (and at random, the reference), train a "
               "fresh run on each kept set with the run's own recipe and seeds, record test accuracy and the share "
               "of noisy examples kept. GraNd at initialisation and EL2N at epoch k as in Data Diet; forgetting "
               "counts at the end. Writes RUN/results/prune.h5; fresh runs live under RUN/children.")
FLAGS = {"by": "--by", "keep": "--keep", "runs": "--also"}
INTERRUPTED = "finished runs under RUN/children are kept; rerun the same command to go on"


def arguments(p):
    p.add_argument("--by", default="el2n,grand,forgetting",
                   help=f"comma-separated scores: {', '.join(n for n in SCORES if n != 'neuron_count')}")
    p.add_argument("--keep", default="0.9,0.7,0.5,0.3", help="comma-separated fractions of the training set kept, in (0, 1]")
    p.add_argument("--mode", default="hardest", choices=MODES,
                   help="which examples each score keeps: hardest (drop the easiest; Data Diet, Toneva et al.), "
                        "easiest, or window (skip the --offset hardest fraction, then keep the next)")
    p.add_argument("--offset", type=number(float, 0, 1, high_open=True), default=0.1,
                   help="hardest fraction skipped in --mode window")
    p.add_argument("--checkpoint-k", type=nonnegative_int, default=None,
                   help="epoch of EL2N (default: 10%% of training, at least 1)")
    p.add_argument("--also", nargs="+", default=[], metavar="RUN2",
                   help="more runs of the same data (other seeds) whose scores are averaged with RUN's (Data Diet "
                        "averages 10); the fresh runs use RUN's recipe")
    p.add_argument("--grand-epoch", type=nonnegative_int, default=0, help="epoch of GraNd (Data Diet: 0, initialisation)")
    add_experiment(p)


def execute(args):
    return prune(args.run, by=args.by, keep=_fractions(args.keep), mode=args.mode, offset=args.offset,
                 seeds=args.seeds, checkpoint_k=args.checkpoint_k, grand_epoch=args.grand_epoch, also=args.also, jobs=args.jobs,
                 device=args.device)


def _fractions(text):
    from ..core.errors import MemlocError
    try:
        return [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise MemlocError(f"keep must be comma-separated fractions, got {text!r}", argument="keep") from None


def summary(res, args):
    keeps = res["keep"].values
    head = f"{'kept':<12}" + "".join(f"{k:>22g}" for k in keeps)
    lines = [f"test accuracy (mean +- s.e. over {res.sizes['seed']} seed(s); all data: "
             f"{mean_se(res['full_accuracy'].values)})", head]
    for m in res["score"].values:
        acc = res["test_accuracy"].sel({"score": m}).values
        lines.append(f"{str(m):<12}" + "".join(f"{mean_se(acc[j]):>22}" for j in range(len(keeps))))
    if np.isfinite(res["noisy_kept"].values).any():
        lines.append("share of the noisy examples kept (seed mean):")
        for m in res["score"].values:
            lines.append(f"{str(m):<12}" + "".join(f"{v:>22.3f}" for v in res["noisy_kept"].sel({"score": m}).mean("seed").values))
    return "\n".join(lines)
