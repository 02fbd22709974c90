"""``memloc flip RUN``: greedy gradient-guided unit zeroing (:func:`memloc.flip`)."""
import json
import sys

import numpy as np

from ..flip import DTYPES, REF_POOLS, flip
from ..flip.driver import part_settings, settings
from ..flip.store import PartStore
from ..run import load
from ..units import SITES
from .runner import add_eval_batch_size, nonnegative_float, nonnegative_int, number, positive_int

RESULT = "flip"
DESCRIPTION = ("Greedy gradient-guided unit zeroing: for each example, zero units one at a time (the one whose "
               "zeroing most raises the example's loss relative to a reference batch's loss, to first order) "
               "until the prediction changes. Writes RUN/results/flip.h5; an interrupted run continues when the "
               "same command is run again.")
INTERRUPTED = "finished searches are saved (rerun to continue)"
OVERWRITE_HELP = "replace an existing flip.h5 (or an interrupted search) made with other settings"


def arguments(p):
    p.add_argument("--examples", default="noisy:100,clean:100",
                   help="which training examples to search: comma-separated terms, each POOL:COUNT (POOL = noisy, "
                        "clean or any; COUNT a number or 'all'; drawn with --seed), an example id (17), an inclusive "
                        "id range (10-19), or ids prefixed by 'ids:' (ids:1,5,9). Examples the model misclassifies "
                        "are recorded with status 1 and not searched")
    p.add_argument("--checkpoint", type=nonnegative_int, default=None,
                   help="checkpoint epoch to analyse (default: the final one)")
    p.add_argument("--max-units", type=positive_int, default=100,
                   help="give up after zeroing this many units (recorded as not flipped)")
    p.add_argument("--noise-samples", type=nonnegative_int, default=0,
                   help="average the target's logits over this many Gaussian-noised copies of it (0 = off)")
    p.add_argument("--noise-ratio", type=nonnegative_float, default=0.01,
                   help="noise norm as a fraction of the input's norm")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="searches per example, each with its own reference batch")
    p.add_argument("--ref-batch-size", type=positive_int, default=64,
                   help="reference batch size B (the objective is the reference batch's mean loss minus the "
                        "example's loss)")
    p.add_argument("--ref-pool", default="clean", choices=REF_POOLS,
                   help="draw reference batches from clean training examples or from all of them")
    p.add_argument("--site", default="pre_norm", choices=SITES,
                   help="zero a unit at its layer's output (pre_norm) or after the norm that follows it (post_norm)")
    p.add_argument("--collateral", action="store_true",
                   help="also record clean-train / noisy-train / noisy-true / test accuracy with each example's "
                        "units zeroed (one pass over the data per search)")
    p.add_argument("--group-size", type=positive_int, default=32,
                   help="searches run at once (memory grows with group size x (B + copies))")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="computation precision; float64 makes the unit sequences independent of --group-size "
                        "and of interruptions (near-ties are not decided by rounding), at 2-4x the CPU time")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of example sampling, reference batches and noise")
    add_eval_batch_size(p)


def _options(args) -> dict:
    return dict(examples=args.examples, checkpoint=args.checkpoint, max_units=args.max_units,
                noise_samples=args.noise_samples, noise_ratio=args.noise_ratio, repeats=args.repeats, site=args.site,
                collateral=args.collateral, group_size=args.group_size, ref_batch_size=args.ref_batch_size,
                ref_pool=args.ref_pool, seed=args.seed, dtype=args.dtype)


def _requested(args, run):
    """The config and part-file settings this command would search with."""
    options = {k: v for k, v in _options(args).items() if k != "group_size"}
    options["checkpoint"] = run.final_epoch if args.checkpoint is None else args.checkpoint
    config, ids, _ = settings(run.is_noisy, **options)
    return config, part_settings(config, ids)


def already_done(args, run) -> bool:
    """Does the saved flip result hold exactly these settings?"""
    stored = run.result("flip").config
    return all(stored.get(k) == v for k, v in _requested(args, run)[0].items())


def resumable(args, run) -> bool:
    """Is an interrupted search with exactly these settings saved (e.g. one started with --overwrite)?"""
    parts = run.results_path("flip").with_name("flip.partial")
    return PartStore.saved_settings(parts) == json.loads(json.dumps(_requested(args, run)[1]))


def execute(args):
    return flip(load(args.run), **_options(args), eval_batch_size=args.eval_batch_size, device=args.device,
                overwrite=args.overwrite, log=lambda message: print(message, file=sys.stderr))


def summary(res, args):
    searched = res["status"].values == 0
    noisy = res["is_noisy"].values.astype(bool)
    count = res["neuron_count"].values
    parts = [f"{searched.sum()} of {res.sizes['example']} examples searched"]
    for key, rows in (("noisy", searched & noisy), ("clean", searched & ~noisy)):
        if rows.any():
            parts.append(f"{key}: median {np.median(count[rows]):g} units, "
                         f"{100 * res['flipped'].values[rows].mean():.0f}% flipped")
    return "; ".join(parts)
