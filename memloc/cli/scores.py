"""``memloc scores RUN``: per-example scores (:func:`memloc.scores`)."""
import numpy as np

from ..scale.distributed import world
from ..core.run import load
from ..analyses.scores import GRAD_NORM_METHODS, SCORES, scores, select_scores
from .runner import add_precision, nonnegative_int, positive_int

RESULT = "scores"
DESCRIPTION = ("Per-example memorisation / label-noise scores of a run, written to RUN/results/scores.h5 (raw "
               "values plus each score's direction: +1 = higher means more likely mislabeled, -1 = lower does).")
FLAGS = {"names": "--scores"}
SHARDED = True     # torchrun --nproc-per-node K -m memloc scores RUN: the cells of the logits / gradient passes split K ways
INTERRUPTED = "finished work is saved (rerun to continue)"
OVERWRITE_HELP = "replace an existing scores.h5 (or an interrupted scores run saved with other settings)"


def arguments(p):
    p.add_argument("--scores", default="all",
                   help="comma-separated score names, or 'all' (neuron_count only if results/flip.h5 "
                        f"exists); names: {', '.join(SCORES)}")
    p.add_argument("--checkpoint-k", type=nonnegative_int, default=None,
                   help="checkpoint epoch of el2n and grand (default: 10%% of training, at least 1)")
    p.add_argument("--grad-method", default="hooks", choices=list(GRAD_NORM_METHODS),
                   help="per-example gradient norms for grand: hooks = per-layer norm tricks, "
                        "vmap = torch.func over the whole model, loop = one backward per example")
    p.add_argument("--batch-size", type=positive_int, default=256, help="examples per forward pass (el2n, grand, tracin)")
    add_precision(p, "run el2n's forward passes under autocast in bf16 or fp16 (the gradient norms of grand and "
                     "tracin stay fp32; the dynamics scores read what training recorded); fp32 (default) computes "
                     "exactly as without this option")


def execute(args):
    run = load(args.run)
    if args.scores == "all" and "neuron_count" not in select_scores("all", run) and world()[0] == 0:
        print(f"memloc scores: no {run.results_path('flip')}; neuron_count skipped")
    return scores(run, names=args.scores, checkpoint_k=args.checkpoint_k, grad_method=args.grad_method,
                  batch_size=args.batch_size, device=args.device, resume_dir="auto", overwrite=args.overwrite,
                  precision=args.precision)


def summary(res, args):
    lines = []
    for name in res.data_vars:
        v = res[name].values
        ok = np.isfinite(v)
        lines.append(f"{name:<13} dir {int(res[name].attrs['direction']):+d}  defined {ok.sum():>6}/{len(v)}  "
                     f"mean {np.mean(v[ok]) if ok.any() else float('nan'):.4g}")
    return "\n".join(lines)
