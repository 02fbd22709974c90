"""``memloc unlearn RUN``: remove memorised labels from the trained model, per method (:func:`memloc.unlearn`)."""
from ..actions.unlearn import GROUPS, HYPER, METHODS, unlearn
from .runner import mean_se, nonnegative_float, number, positive_float, positive_int

RESULT = "unlearn"
DESCRIPTION = ("Remove memorised labels from the final model without retraining from scratch: fine-tuning on the "
               "retain set, gradient ascent on the forget set, fine-tuning protected by EWC / MAS penalties or LwF "
               "distillation, zeroing the forget set's flip units, retraining the most critical layer. Accuracy on the "
               "forget set (given labels: memorisation left; true labels), retain set and test, with the cost. Writes "
               "RUN/results/unlearn.h5.")
FLAGS = {"lam": "--lambda"}


def arguments(p):
    p.add_argument("--forget", default="noisy",
                   help="examples to forget: noisy (ground truth), flagged (memloc issues' flags: no ground truth), "
                        "class:C or ids:1,2,3")
    p.add_argument("--method", dest="methods", default="all",
                   help=f"comma-separated methods, or all (every method whose inputs exist: zero needs a flip result, "
                        f"etd_drop a run with example-tied dropout): {', '.join(METHODS)}")
    p.add_argument("--epochs", type=positive_int, default=HYPER["epochs"], help="fine-tuning epochs over the retain set")
    p.add_argument("--lr", type=positive_float, default=HYPER["lr"], help="fine-tuning learning rate (SGD, momentum 0.9)")
    p.add_argument("--lambda", dest="lam", type=nonnegative_float, default=None,
                   help=f"penalty weight of ewc / mas and distillation weight of lwf (default {HYPER['lam']})")
    p.add_argument("--retrain-epochs", type=positive_int, default=20, help="epochs of retrain_layer")
    p.add_argument("--seeds", type=number(int, 0, 2**32 - 1), nargs="+", default=[0, 1, 2],
                   help="seeds of the batch order (mean and standard error over them)")


def execute(args):
    return unlearn(args.run, forget=args.forget, methods=args.methods, seeds=args.seeds, epochs=args.epochs, lr=args.lr,
                   lam=args.lam, retrain_epochs=args.retrain_epochs, device=args.device)


def summary(res, args):
    lines = [f"forget set: {res.sizes['forget']} examples ({res.config['forget']}); accuracy (mean +- s.e. over "
             f"{res.sizes['seed']} seed(s)):",
             f"{'method':<14}" + "".join(f"{g:>22}" for g in GROUPS) + f"{'seconds':>10}",
             f"{'(trained)':<14}" + "".join(f"{v:>22.4f}" for v in res["baseline"].values)]
    for m in res["technique"].values:
        r = res.sel(technique=m)
        lines.append(f"{str(m):<14}" + "".join(f"{mean_se(r['accuracy'].sel(group=g).values):>22}" for g in GROUPS)
                     + f"{float(r['seconds'].mean()):>10.1f}")
    return "\n".join(lines)
