"""Greedy gradient-guided unit zeroing: how many units must be zeroed to flip one example?

``memloc.flip(run_or_model, data=None, *, examples="noisy:100,clean:100", max_units=100, repeats=1)``
(command: ``python -m memloc flip RUN --examples noisy:100,clean:100``).

For a target training example ``x`` with given label ``y`` (which the model predicts), repeat:

1. under the example's current unit mask ``m`` (1 = kept, 0 = zeroed), compute the objective
   ``O(m) = mean_b loss(x_b, y_b) - loss(x, y)`` over a reference batch ``b`` of training
   examples (clean ones by default, ``ref_pool``; the paper's "target weight -B inside a batch mean": gradient *ascent* on the target's
   loss while keeping the reference loss low);
2. if the predicted class of ``x`` is no longer ``y``: stop, the example flipped after ``len(zeroed)``
   units; if ``max_units`` units are already zeroed: stop, "not flipped";
3. score every kept unit ``j`` by the first-order *decrease* of ``O`` when it is zeroed: zeroing
   changes ``m_j`` by ``-m_j``, so ``O`` changes by about ``-m_j * dO/dm_j``, and the score is
   ``m_j * dO/dm_j`` = activation x gradient of ``O`` summed over spatial positions (what
   :func:`memloc.core.units.unit_masks` leaves in ``mask.grad``). A high score means zeroing the unit
   raises the target's loss and/or lowers the reference loss. Zero the unit with the highest
   score (already zeroed units are never picked; ties go to the lowest global unit id) and go to 1.

Options: ``noise_samples=n`` replaces the target by ``n`` Gaussian-noised copies whose logits
are averaged (noise norm = ``noise_ratio`` x input norm, redrawn every step from a seed of
(seed, example id, repeat, step)); ``repeats=R`` runs the search R times with different
reference batches (drawn once per repeat, seeded; the target itself is left out of its own
reference mean).

Many searches run at once (:class:`FlipSearch`): each example of a group has its own mask row; one
forward/backward per step evaluates every example's noisy copies under its mask, and the
reference batch under each example's mask. The reference term depends only on (repeat, set of
zeroed units), so it is memoised: searches that reach the same mask share one evaluation (on the
MNIST-5k lenet run, 743 steps of 199 searches needed 75 reference evaluations). The network up
to the first unit layer is computed once per reference batch. The stopping test is a forward of
the targets alone, so the last step of a search costs no reference evaluation. Finished
searches leave the group and queued ones take their place. With ``dtype="float64"`` the unit sequences do not depend on the
group size (the tests check them against a plain one-example-at-a-time implementation).

Returns the ``"flip"`` result (:mod:`memloc.core.schemas`): per example ``is_noisy, label, status,
neuron_count`` (status 1 = misclassified, not searched), per (example, repeat) ``n_units, flipped,
layer_hist, collateral``, the ordered unit ids as ``unit_ids`` / ``unit_offsets`` (flat + offsets).
Language models (:mod:`memloc.core.tasks`): the memorisation targets are the noisy examples; a
sequence's loss is its suffix loss, "predicted" means its suffix reproduced exactly (the argmax right
at every suffix position, teacher-forced), so a search zeroes units until the suffix is no longer
reproduced; ``site="weight"`` zeroes the weights and biases of the blocks' projections (embeddings,
norms and the logits layer are left out) and ``noise_samples`` puts the Gaussian noise on the token
embeddings (:mod:`memloc.analyses.flip.embed_noise`). ``units="mlp" | "heads" | "both"`` searches a language model's
MLP hidden neurons, attention heads (zeroing a head zeroes its slice of the attention output before
the output projection) or both instead of its layers' output features (:mod:`memloc.core.neurons`).

The search is resumable: finished searches are saved in atomically written part files
(``RUN/results/flip.partial/``); rerunning with the same settings continues where a killed run
stopped, and the parts are deleted once the result is saved.
"""
from .driver import DTYPES, REF_POOLS, flip
from .search import FlipSearch, FlipTrace, noise_seed, noisy_copies
from .select import EXAMPLE_POOLS, examples_spec, reference_batches, select_examples
from .store import layer_histogram
import sys
import numpy as np
from .driver import PROTOCOLS, SITES, WEIGHT_LOOP, part_settings, protocol_options, settings
from ...scale.parts import canonical_settings, saved_settings
from ...core.run import load
from ...core.neurons import UNIT_KINDS
from ...core.runtime import partial_folder
from ...core.options import add_eval_batch_size, add_precision, nonnegative_float, nonnegative_int, number, positive_int
from ...core.figures import figure, plt, COLORS, LABELS, save_figure, table, short_names, coord_names
from ...core.schemas import Schema, Var, SUBSET_VAR, EXAMPLE_VAR
from ...core.registry import Analysis, Command

__all__ = ["flip", "select_examples", "examples_spec", "reference_batches", "noise_seed", "noisy_copies", "FlipSearch",
           "FlipTrace", "layer_histogram", "DTYPES", "REF_POOLS", "EXAMPLE_POOLS"]


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--examples", default="noisy:100,clean:100",
                   help="which training examples to search: comma-separated terms, each POOL:COUNT (POOL = noisy, "
                        "clean or any; COUNT a number or 'all'; drawn with --seed), an example id (17), an inclusive "
                        "id range (10-19), or ids prefixed by 'ids:' (ids:1,5,9). Examples the model misclassifies "
                        "(a language model's sequences whose suffix it does not reproduce exactly; noisy = the "
                        "memorisation targets) are recorded with status 1 and not searched")
    p.add_argument("--checkpoint", type=nonnegative_int, default=None,
                   help="checkpoint epoch to analyse (default: the final one)")
    p.add_argument("--max-units", type=positive_int, default=100,
                   help="give up after zeroing this many units (recorded as not flipped)")
    p.add_argument("--protocol", default="memloc", choices=list(PROTOCOLS),
                   help="defaults of the six options below: memloc (site pre_norm, no noise, B = 64) or paper (the "
                        "authors' released code: site weight, logits averaged over 5 noised copies, B = 512, capped "
                        "at the clean pool); options given explicitly always win")
    p.add_argument("--site", default=None, choices=SITES,
                   help="what is zeroed: a unit at its layer's output (pre_norm, memloc's default: one channel / "
                        "feature, comparable across layers), after the norm that follows it (post_norm), or a "
                        "parameter item by the official rule (weight: a whole conv filter, any other weight, bias or "
                        "norm scale / shift element by element, scored by weight x gradient; on a language model the "
                        "weights and biases of its blocks' projections)")
    p.add_argument("--units", default="outputs", choices=UNIT_KINDS,
                   help="which units a search zeroes: every conv / linear layer's output features (outputs, "
                        "default); on a language model its MLP hidden neurons (mlp), its attention heads (heads: a "
                        "head's slice of the attention output before the output projection) or both")
    p.add_argument("--noise-samples", type=nonnegative_int, default=None,
                   help="average the target's logits over this many Gaussian-noised copies of it (a language "
                        "model's: of its token embeddings; 0 = off; default 0, paper protocol 5)")
    p.add_argument("--noise-ratio", type=nonnegative_float, default=None,
                   help="noise norm as a fraction of the input's norm (a language model: of its token "
                        "embeddings' norm; default 0.01)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="searches per example, each with its own reference batch (default 1)")
    p.add_argument("--ref-batch-size", type=positive_int, default=None,
                   help="reference batch size B (the objective is the reference batch's mean loss minus the "
                        "example's loss; default 64, paper protocol 512)")
    p.add_argument("--ref-pool", default=None, choices=REF_POOLS,
                   help="draw reference batches from clean training examples (default) or from all of them")
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
    add_precision(p, "run the searches' forward passes under autocast in bf16 or fp16 (faster on GPUs with tensor "
                     "cores; unit sequences can differ from fp32 at near-ties; needs --dtype float32); fp32 (default) "
                     "computes exactly as without this option")


PROTOCOL_OPTIONS = ("site", "noise_samples", "noise_ratio", "repeats", "ref_batch_size", "ref_pool")


def _cli_options(args) -> dict:
    return dict(examples=args.examples, checkpoint=args.checkpoint, max_units=args.max_units,
                collateral=args.collateral, group_size=args.group_size, seed=args.seed, dtype=args.dtype,
                precision=args.precision, units=args.units,
                protocol=args.protocol, **{k: getattr(args, k) for k in PROTOCOL_OPTIONS})


def _cli_requested(args, run):
    """The config and part-file settings this command would search with."""
    options = {k: v for k, v in _cli_options(args).items() if k not in ("group_size", "protocol") + PROTOCOL_OPTIONS}
    options.update(protocol_options(args.protocol, run.is_noisy, **{k: getattr(args, k) for k in PROTOCOL_OPTIONS}))
    options["checkpoint"] = run.final_epoch if args.checkpoint is None else args.checkpoint
    config, ids, _ = settings(run.is_noisy, **options)
    return config, part_settings(config, ids)


def _cli_already_done(args, run) -> bool:
    """Does the saved flip result hold exactly these settings?"""
    stored = {"precision": "fp32", "units": "outputs", **run.result("flip").config}   # older results: their defaults
    return all(stored.get(k) == v for k, v in _cli_requested(args, run)[0].items())


def _cli_resumable(args, run) -> bool:
    """Is an interrupted search with exactly these settings saved (e.g. one started with --overwrite)?"""
    parts = partial_folder(run.results_path("flip"))
    return saved_settings(parts) == canonical_settings(_cli_requested(args, run)[1])


def _cli_execute(args):
    return flip(load(args.run), **_cli_options(args), eval_batch_size=args.eval_batch_size, device=args.device,
                overwrite=args.overwrite, log=lambda message: print(message, file=sys.stderr))


def _cli_summary(res, args):
    searched = res["status"].values == 0
    noisy = res["is_noisy"].values.astype(bool)
    count = res["neuron_count"].values
    parts = [f"{searched.sum()} of {res.sizes['example']} examples searched"]
    word = "items" if res.config.get("site") == "weight" else "units"
    for key, rows in (("noisy", searched & noisy), ("clean", searched & ~noisy)):
        if rows.any():
            parts.append(f"{key}: median {np.median(count[rows]):g} {word}, "
                         f"{100 * res['flipped'].values[rows].mean():.0f}% flipped")
    if res.config.get("weight_site_path") == "loop":
        parts.append(f"{WEIGHT_LOOP}: {res.config.get('weight_site_fallback')}")
    return "; ".join(parts)


def plot_flip(res, out, run=None) -> str:
    """Units needed to flip noisy vs clean examples, and where the critical units are."""
    cfg = res.config
    searched = res["status"].values == 0
    noisy = res["is_noisy"].values.astype(bool)
    n_units, flipped = res["n_units"].values, res["flipped"].values
    hist = res["layer_hist"].values                              # (K, R, L)
    layers = coord_names(res)
    collateral = res["collateral"].values
    cap = int(cfg.get("max_units", n_units.max(initial=0)))
    count = np.where(flipped, n_units, cap + 1).mean(1)      # the neuron-count score
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.histogram_bin_edges(count[searched], bins=min(cap + 2, 40)) if searched.any() else 10
    groups = {"clean": searched & ~noisy, "noisy": searched & noisy}
    for key, rows in groups.items():
        if rows.any():
            a.hist(count[rows], bins=bins, alpha=0.6, color=COLORS[key], label=f"{key} (n={rows.sum()})")
    a.set(xlabel=f"units zeroed to flip the prediction (> {cap} = not flipped)", ylabel="examples",
          title="units needed")
    if a.get_legend_handles_labels()[0]:   # no example searched (none reproduced exactly): nothing to label
        a.legend(fontsize=8)
    width = 0.4
    x = np.arange(len(layers))
    for k, (key, rows) in enumerate(groups.items()):
        total = hist[rows].sum(axis=(0, 1)).astype(float)
        if total.sum():
            b.bar(x + (k - 0.5) * width, 100 * total / total.sum(), width, color=COLORS[key], label=key)
    b.set_xticks(x, short_names(layers), rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center",
                 fontsize=7)
    b.set(ylabel="% of zeroed units", title="layer of the critical units")
    if b.get_legend_handles_labels()[0]:   # no units zeroed at all: nothing to label
        b.legend(fontsize=8)
    name = save_figure(fig, out, "flip.png")
    rows = []
    for key, r in groups.items():
        if r.any():
            rows.append([key, int(r.sum()), float(np.median(count[r])), 100 * float(flipped[r].mean())])
    text = (f"## Unit zeroing (flip)\n\nGreedy gradient-guided zeroing of units (site `{cfg.get('site')}`, "
            f"units `{cfg.get('units', 'outputs')}`, "
            f"at most {cap} units) until the example's prediction changes (a language model's sequence: until its "
            "suffix is no longer reproduced exactly).\n\n"
            + figure("flip", name, "left, how many units had to be zeroed before each searched example's "
                     "prediction left its label, noisy and clean apart: noisy examples further left are stored in "
                     "fewer units. Right, the layers the zeroed units lie in.") + "\n\n"
            + table(["examples", "searched", "median units", "% flipped"], rows, digits=1))
    if cfg.get("weight_site_path") == "loop":
        text += f"\n\nNote: {WEIGHT_LOOP}: {cfg.get('weight_site_fallback')}."
    if groups["clean"].any() and groups["noisy"].any():
        from sklearn.metrics import roc_auc_score
        auc = roc_auc_score(noisy[searched], -count[searched])
        text += f"\n\nAUROC of 'fewer units = noisy' on the searched examples: {auc:.3f}."
    if collateral is not None and np.isfinite(collateral).any():
        mean = np.nanmean(collateral[searched], axis=(0, 1))
        text += ("\n\nMean accuracy (%) of the model with one example's units zeroed (collateral damage): "
                 + ", ".join(f"{LABELS.get(s, s)} {100 * v:.1f}" for s, v in zip(coord_names(res, "subset"), mean)) + ".")
    return text


ANALYSIS = Analysis(
    name="flip", order=50, compute=flip,
    plot=plot_flip,
    schema=Schema("flip", "greedy gradient-guided unit zeroing until the prediction flips (memloc.flip); at "
                  "config site = weight the units are parameter items (a conv filter, or one element of any other "
                  "parameter) and the layers are parameters",
                  {**EXAMPLE_VAR, "repeat": Var(("repeat",), "search repeat (own reference batch)"),
                   "layer": Var(("layer",), "unit space (layer) name (weight site: parameter name; config units mlp / heads / both: the down- / output projection whose input features / head slices are the units)"), **SUBSET_VAR},
                  {"is_noisy": Var(("example",), "the example's given label is wrong (a sequence: a memorisation target)"),
                   "label": Var(("example",), "given label searched (-1: a language model's sequence)"),
                   "status": Var(("example",), "0 = searched, 1 = misclassified by the model (a sequence: its suffix "
                                               "not reproduced exactly; not searched)"),
                   "neuron_count": Var(("example",), "mean units to flip over repeats (not flipped = max_units + 1; NaN = not searched)"),
                   "n_units": Var(("example", "repeat"), "units zeroed"),
                   "flipped": Var(("example", "repeat"), "the prediction left the given label"),
                   "layer_hist": Var(("example", "repeat", "layer"), "zeroed units per layer"),
                   "collateral": Var(("example", "repeat", "subset"), "accuracy with the example's units zeroed (NaN = not measured)"),
                   "unit_ids": Var(("zeroed",), "global unit ids in zeroing order, all searches concatenated"),
                   "unit_offsets": Var(("row",), "search example*R + repeat spans unit_ids[unit_offsets[row]:unit_offsets[row+1]]"),
                   "layer_size": Var(("layer",), "units in the layer"),
                   "layer_offset": Var(("layer",), "global id of the layer's first unit"),
                   "reference": Var(("repeat", "ref"), "example ids of each repeat's reference batch")}),
    command=Command(name="flip", group="localisation", example="memloc flip RUN --examples noisy:50,clean:50",
                    help="greedy gradient-guided unit zeroing until each example's prediction flips",
                    sharded=True,
                    description="Greedy gradient-guided unit zeroing: for each example, zero units (or, with --site weight, "
                                "parameter items as in the authors' code) one at a time (the one whose "
                                "zeroing most raises the example's loss relative to a reference batch's loss, to first order) "
                                "until the prediction changes (on a language model's run: until the sequence's suffix is "
                                "no longer reproduced exactly; the memorisation targets are the noisy examples). "
                                "Writes RUN/results/flip.h5; an interrupted run continues when the "
                                "same command is run again. Under torchrun (torchrun --nproc-per-node K -m memloc flip RUN ...) the "
                                "searches are split across the K processes and rank 0 writes the merged result.",
                    interrupted="finished searches are saved (rerun to continue)",
                    overwrite_help="replace an existing flip.h5 (or an interrupted search) made with other settings",
                    summary=_cli_summary,
                    arguments=_cli_arguments,
                    already_done=_cli_already_done,
                    resumable=_cli_resumable,
                    execute=_cli_execute),
)
