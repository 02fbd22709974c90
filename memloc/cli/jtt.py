"""``memloc jtt RUN``: just train twice, the error set upweighted (:func:`memloc.jtt`)."""
from ..actions.jtt import jtt
from ..actions.jtt import GROUPS
from .runner import add_experiment, mean_se, nonnegative_int, positive_float

RESULT = "jtt"
SHARDED = True     # torchrun --nproc-per-node K -m memloc jtt RUN: the fresh runs split K ways (rank r trains every K-th)
DESCRIPTION = ("JTT (Liu et al. 2021): the training examples the run's model of epoch T misclassifies are upweighted "
               "by LAMBDA in fresh runs with the run's recipe; accuracy of ERM and JTT on test, the worst test class, "
               "clean and noisy training examples. Writes RUN/results/jtt.h5; fresh runs live under RUN/children.")
FLAGS = {"id_epoch": "--id-epochs"}
INTERRUPTED = "finished runs under RUN/children are kept; rerun the same command to go on"


def arguments(p):
    p.add_argument("--id-epochs", "--id-epoch", dest="id_epoch", type=nonnegative_int, default=None,
                   help="epoch T of the identification model (default: 10%% of training, at least 1)")
    p.add_argument("--upweight", type=positive_float, default=5.0, help="lambda_up, the error set's loss weight")
    add_experiment(p)


def execute(args):
    return jtt(args.run, id_epoch=args.id_epoch, upweight=args.upweight, seeds=args.seeds, jobs=args.jobs,
               device=args.device)


def summary(res, args):
    lines = [f"error set of epoch {res.config['id_epoch']}: {res.sizes['error']} examples"
             + (f" ({float(res['error_set_noisy']):.1%} noisy)" if res['error_set_noisy'].notnull() else ""),
             f"accuracy (mean +- s.e. over {res.sizes['seed']} seed(s)), upweight {res.config['upweight']:g}:",
             f"{'group':<12}" + "".join(f"{m:>22}" for m in res["variant"].values)]
    for g in GROUPS:
        lines.append(f"{g:<12}" + "".join(f"{mean_se(res['accuracy'].sel(variant=m, group=g).values):>22}"
                                          for m in res["variant"].values))
    return "\n".join(lines)
