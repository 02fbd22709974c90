"""Which MLP neurons of a language model hold a memorised sequence? Neuron localisation, after MemPi.

``memloc.localise_neurons(run_or_model, data=None, *, examples="memorised", methods=METHODS)``
(command: ``memloc localise-neurons RUN``) scores every MLP hidden neuron (:mod:`memloc.core.neurons`:
the input features of each block's down-projection, for TinyGPT, GPT-2, GPT-NeoX and Llama alike) of
every layer for each target sequence, by each method; higher = more responsible for reproducing the
target's suffix from its prefix. The methods compared by MemPi (Chang et al., NAACL 2024) and memloc's own:

- ``zero_out``: increase of the suffix loss when the neuron alone is zeroed (:mod:`.zero_out`);
- ``activations``: |mean activation| on the suffix-predicting positions x output-weight norm (:mod:`.activations`);
- ``ig``: integrated gradients of the suffix log-likelihood, per layer, by captum (:mod:`.ig`);
- ``slimming`` / ``hard_concrete``: learned masks with an L1 / L0 penalty (:mod:`.masks`);
- ``grad_x_act``: first-order loss increase of zeroing, one pass; ``greedy``: memloc's gradient-guided
  zeroing until the suffix is no longer reproduced and (by default) 1% of every layer's neurons are
  zeroed, the order zeroed first (:mod:`.greedy`);
- ``random``: uniform scores (the baseline).

Default hyper-parameters: :data:`HYPER` (MemPi's GPT-2 settings); ``options={method: {name: value}}``
overrides them. :func:`neuron_scores` is the array-level core (a model and a (B, T) token tensor).
The ``"localise_neurons"`` result holds ``score`` (method, target, layer, neuron), the seconds each
method took, and per target its suffix loss, memorisation and kind, and greedy's count of zeroed neurons.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ...core.errors import MemlocError
from ...core.lm import sequence_measures
from ...core.options import add_precision, nonnegative_int, number, positive_int
from ...core.registry import Analysis, Command
from ...core.results import Result
from ...core.neurons import UNIT_KINDS, unit_layers
from ...core.precision import check_precision
from ...core.runtime import check_choices, check_range, split_list
from ...core.schemas import Schema, Var
from ...core.selection import lm_source
from ...core.sequences import SequenceSet
from ...core.store import stored
from ...scale.distributed import world
from ...scale.parts import Columns, parts_folder, split_rows
from .plots import plot_localise
from .common import HYPER, METHODS
from .methods import check_localised_units, method_options, neuron_scores, resolved_options

__all__ = ["localise_neurons", "neuron_scores", "method_options", "resolved_options", "select_targets",
           "reference_rows", "parse_settings", "target_parts",
           "METHODS", "HYPER"]


def select_targets(model, data: SequenceSet, examples="memorised", *, eval_batch_size: int = 64,
                   precision: str = "fp32") -> np.ndarray:
    """Rows of ``data`` to localise: ``"memorised"`` (the memorisation targets the model reproduces, in
    ``precision``), ``"memorised:N"`` (the first N of them), ids (a list or array) or a boolean mask."""
    if examples is None or (isinstance(examples, str) and examples.startswith("memorised")):
        name, _, count = (examples or "memorised").partition(":")
        if name != "memorised" or (count and not count.isdigit()):
            raise MemlocError(f"examples {examples!r}: give memorised, memorised:N, ids or a mask", argument="examples")
        memorised = sequence_measures(model, data.tokens, data.prefix_len, data.suffix_len,
                                      eval_batch_size=eval_batch_size, precision=precision)["memorised"]
        rows = np.flatnonzero(memorised & data.is_memorised_target)
        rows = rows[:int(count)] if count else rows
        if not len(rows):
            raise MemlocError("the model reproduces none of its memorisation targets at this checkpoint: choose "
                              "targets by sequence id, e.g. {examples}", options={"examples": "0,1,2"})
        return rows
    if isinstance(examples, str):
        examples = [int(i) for i in split_list(examples) if i.lstrip("-").isdigit()] or examples
    arr = np.asarray(examples)
    if arr.dtype == bool:
        if arr.shape != (len(data),):
            raise MemlocError(f"examples mask has shape {arr.shape}; give one flag per sequence, ({len(data)},)",
                              argument="examples")
        arr = np.flatnonzero(arr)
    if arr.dtype.kind not in "iu" or arr.ndim != 1 or not len(arr):
        raise MemlocError(f"examples {examples!r}: give memorised, memorised:N, sequence ids or a mask",
                          argument="examples")
    where = {int(i): r for r, i in enumerate(data.ids)}
    bad = [int(i) for i in arr if int(i) not in where]
    if bad:
        raise MemlocError(f"examples holds {bad[0]}, which is no sequence id (0..{len(data) - 1})", argument="examples")
    return np.asarray([where[int(i)] for i in arr], dtype=np.int64)


def reference_rows(data: SequenceSet, ref_batch_size: int, *, exclude=(), seed: int = 0) -> np.ndarray:
    """``ref_batch_size`` rows of ``data``'s non-target training sequences (not in ``exclude``), drawn
    with ``seed``: the reference whose loss greedy zeroing keeps low (fewer when fewer exist)."""
    ref_batch_size = check_range("ref_batch_size", ref_batch_size, low=0, integer=True)
    pool = np.setdiff1d(np.flatnonzero(~data.is_memorised_target), np.asarray(exclude, dtype=np.int64))
    return np.sort(np.random.default_rng(seed).permutation(pool)[:ref_batch_size])


def target_parts(source, resume, name: str):
    """The parts folder of analysis ``name`` (:func:`memloc.scale.parts.parts_folder`: ``resume``, or
    under torchrun / for ``"auto"`` the run's ``results/<name>.partial``) of ``source`` (a run, its path or a model)."""
    from ...core.run import as_run
    return parts_folder(resume, None if isinstance(source, torch.nn.Module) else as_run(source), name)


@stored("localise_neurons")
def localise_neurons(source, data=None, *, examples="memorised", methods=METHODS, options: dict | None = None,
                     ref_batch_size: int = 8, checkpoint: int | None = None, eval_batch_size: int = 64,
                     seed: int = 0, device="auto", precision: str = "fp32", units: str = "mlp", resume=None,
                     overwrite: bool = False) -> Result | None:
    """The ``"localise_neurons"`` result (module docstring) of a language-model run (``source``: a run or
    its path, ``checkpoint`` default final) or of a causal LM module with ``data`` (a SequenceSet), for
    the target sequences ``examples`` (:func:`select_targets`), by ``methods``; greedy keeps the loss of
    ``ref_batch_size`` clean training sequences low (:func:`reference_rows`; 0: none). ``precision``: every
    forward pass under autocast (:mod:`memloc.core.precision`; :func:`neuron_scores`). ``units``: rank the
    MLP neurons (``"mlp"``) or the attention heads (``"heads"``: then ``neuron`` indexes the heads of the
    layer, named after its output projection).

    The targets are localised ``eval_batch_size`` at a time, each target's random streams keyed by its
    sequence id. ``resume``: folder of resumable part files (:class:`memloc.scale.parts.Parts`; ``"auto"``:
    ``RUN/results/localise_neurons.partial``, as the command uses; None: nothing saved in one process), a
    batch of targets per part; ``overwrite`` discards parts made with other settings. Under torchrun
    (:mod:`memloc.scale.distributed`) the batches are split across the processes (None then means
    ``"auto"``) and rank 0 returns the merged result, equal to one process's, the other ranks None."""
    chosen = check_choices("methods", methods, METHODS, "localisation method")     # bad options fail before any work
    check_localised_units(units)
    method_options(options)
    ref_batch_size = check_range("ref_batch_size", ref_batch_size, low=0, integer=True)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    check_precision(precision)
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    folder = target_parts(source, resume, "localise_neurons")
    model, data, epoch = lm_source(source, data, checkpoint=checkpoint, device=device, analysis="localise_neurons")
    dev = next(model.parameters()).device
    check_precision(precision, dev)
    layers = unit_layers(model, units)
    rows = select_targets(model, data, examples, eval_batch_size=eval_batch_size, precision=precision)
    p, s = data.prefix_len, data.suffix_len
    tokens, ids = data.tokens[torch.as_tensor(rows)], np.asarray(data.ids[rows], dtype=np.int64)
    ref = reference_rows(data, ref_batch_size, exclude=rows, seed=seed)
    reference = data.tokens[torch.as_tensor(ref)] if len(ref) else None
    columns = Columns(score=(len(chosen), len(layers), layers[0].size), seconds=(len(chosen),), greedy_zeroed=(),
                      greedy_broken=())

    def work(chunk):        # one batch of targets: every method's scores, its seconds shared out per target
        got = neuron_scores(model, tokens[chunk], p, s, methods=chosen, reference=reference, options=options,
                            eval_batch_size=eval_batch_size, seed=seed, precision=precision, units=units,
                            ids=ids[chunk])
        none = np.zeros(len(chunk))
        return columns.pack(score=np.stack([got["scores"][m] for m in chosen], 1),
                            seconds=np.tile([got["seconds"][m] / len(chunk) for m in chosen], (len(chunk), 1)),
                            greedy_zeroed=got.get("greedy_zeroed", none), greedy_broken=got.get("greedy_broken", none))
    config = {"methods": chosen, "options": resolved_options(options, chosen, len(layers), layers[0].size),
              "prefix_len": p,
              "suffix_len": s, "reference": [int(i) for i in data.ids[ref]], "checkpoint": epoch,
              "eval_batch_size": eval_batch_size, "seed": seed, "device": str(dev), "data": data.name,
              "precision": precision, "units": units}
    got = columns.unpack(split_rows(len(rows), eval_batch_size, work, folder=folder, what="localise_neurons",
                                    settings={**config, "device": dev.type, "targets": ids.tolist()},
                                    overwrite=overwrite))
    if world()[0] > 0:
        return None             # rank 0 returns the merged result
    measures = sequence_measures(model, tokens, p, s, eval_batch_size=eval_batch_size, precision=precision)
    variables = {"score": (("method", "target", "layer", "neuron"), got["score"].transpose(1, 0, 2, 3)),
                 "seconds": ("method", got["seconds"].sum(0)),
                 "suffix_loss": ("target", measures["suffix_loss"].astype(np.float64)),
                 "memorised": ("target", measures["memorised"].astype(bool)),
                 "kind": ("target", np.asarray(data.kind[rows], dtype=str))}
    if "greedy" in chosen:
        variables["greedy_zeroed"] = ("target", got["greedy_zeroed"].astype(np.int64))
        variables["greedy_broken"] = ("target", got["greedy_broken"].astype(bool))
    coords = {"method": chosen, "target": ids, "layer": [layer.name for layer in layers],
              "neuron": np.arange(layers[0].size)}
    return Result("localise_neurons", xr.Dataset(variables, coords=coords), config=config)


# The declaration: command line and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--examples", default="memorised",
                   help="target sequences: memorised (every memorisation target the model reproduces), memorised:N "
                        "(the first N), or comma-separated sequence ids")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods: {', '.join(METHODS)}")
    p.add_argument("--checkpoint", type=nonnegative_int, default=None, help="checkpoint epoch (default: final)")
    p.add_argument("--eval-batch-size", type=positive_int, default=64,
                   help="sequences (or ablations, or IG steps) per forward pass")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method's hyper-parameter (memloc.analyses.localise.HYPER), e.g. greedy.min_zeroed=0 "
                        "(stop greedy at the break; default auto: carry on to 1%% of every layer) or "
                        "slimming.lambda_l1=1000; repeat for several")
    p.add_argument("--ref-batch-size", type=nonnegative_int, default=8,
                   help="clean training sequences whose loss greedy zeroing keeps low (0: the target's loss alone)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                   help="random stream of the random baseline and Hard Concrete's noise")
    p.add_argument("--units", default="mlp", choices=UNIT_KINDS[1:3],
                   help="rank the MLP hidden neurons (mlp, default) or the attention heads (heads: a head's slice of "
                        "the attention output before the output projection)")
    add_precision(p, what="every forward pass (fp16 mask learning with a scaled loss)")


def parse_settings(items) -> dict:
    """``["greedy.min_zeroed=8", ...]`` -> ``{"greedy": {"min_zeroed": 8}}`` (values read as JSON, else text)."""
    import json
    out: dict = {}
    for item in items:
        key, eq, text = str(item).partition("=")
        method, dot, name = key.partition(".")
        if not (eq and dot and method and name):
            raise MemlocError(f"set {item!r}: write METHOD.NAME=VALUE, e.g. greedy.min_zeroed=8", argument="set")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.setdefault(method.strip(), {})[name.strip()] = value
    return out


def _cli_execute(args):
    return localise_neurons(args.run, examples=args.examples, methods=args.methods, checkpoint=args.checkpoint,
                            options=parse_settings(args.set),
                            ref_batch_size=args.ref_batch_size, eval_batch_size=args.eval_batch_size, seed=args.seed,
                            device=args.device, precision=args.precision, units=args.units, resume="auto",
                            overwrite=args.overwrite)


def _cli_summary(res, args):
    score = res["score"]
    what = ("attention layers", "heads", "head") if res.config.get("units") == "heads" else \
        ("MLP layers", "neurons", "neuron")
    lines = [f"{res.sizes['target']} target(s), {res.sizes['layer']} {what[0]} of {res.sizes['neuron']} {what[1]}; "
             f"top {what[2]} per layer of target {int(res['target'][0])}:",
             f"{'method':<14} {'seconds':>9}  " + "  ".join(f"{str(n):>22}" for n in res["layer"].values)]
    for i, m in enumerate(res["method"].values):     # by position: sel(method=...) is xarray's own keyword
        top = score.values[i, 0].argmax(1)
        lines.append(f"{str(m):<14} {float(res['seconds'].values[i]):9.2f}  " + "  ".join(f"{int(j):>22}" for j in top))
    if "greedy_zeroed" in res:
        z = res["greedy_zeroed"].values
        lines.append(f"greedy zeroed a median of {np.median(z):g} neurons to break a suffix "
                     f"({int(res['greedy_broken'].values.sum())} of {len(z)} broken; "
                     f"{int(res['memorised'].values.sum())} of {len(z)} targets were memorised)")
    return "\n".join(lines)


ANALYSIS = Analysis(
    name="localise_neurons", order=157, compute=localise_neurons, plot=plot_localise,
    schema=Schema("localise_neurons", "which MLP neurons hold each target sequence, by each localisation method "
                  "(memloc.localise_neurons)",
  {"method": Var(("method",), "zero_out | activations | ig | slimming | hard_concrete | grad_x_act | greedy | random"),
   "target": Var(("target",), "sequence id of the target"),
   "layer": Var(("layer",), "the MLP's down-projection (its input features are the neurons); config units heads: "
                            "the attention's output projection (its input holds the heads' slices)"),
   "neuron": Var(("neuron",), "neuron (config units heads: head) index within the layer")},
  {"score": Var(("method", "target", "layer", "neuron"), "higher = more responsible for the target's suffix"),
   "seconds": Var(("method",), "seconds the method took for all targets"),
   "suffix_loss": Var(("target",), "the target's suffix loss (nats per token)"),
   "memorised": Var(("target",), "greedy decoding reproduces the target's suffix"),
   "kind": Var(("target",), "clean | noisy | backdoor | canary | duplicate"),
   "greedy_zeroed": Var(("target",), "neurons greedy zeroed", optional=True),
   "greedy_broken": Var(("target",), "the suffix was not reproduced when greedy stopped (within max_zeroed)",
                        optional=True)}),
    command=Command(
        name="localise-neurons", group="localisation", example="memloc localise-neurons RUN",
        help="rank every MLP neuron of a language model for memorised sequences (MemPi's "
             "methods and memloc's greedy zeroing)",
        description="Scores every MLP hidden neuron of every layer for each target sequence by Zero-Out, Activations, "
                    "integrated gradients, Slimming, Hard Concrete (MemPi's methods and settings), gradient x "
                    "activation, memloc's greedy gradient-guided zeroing and a random baseline. Writes "
                    "RUN/results/localise_neurons.h5; an interrupted run continues when the same command is run "
                    "again. Under torchrun (torchrun --nproc-per-node K -m memloc localise-neurons RUN ...) the "
                    "batches of targets are split across the processes, with the one-process result.",
        sharded=True, interrupted="finished batches of targets are saved (rerun to continue)",
        overwrite_help="replace an existing localise_neurons.h5 (or an interrupted one saved with other settings)",
        arguments=_cli_arguments, execute=_cli_execute, summary=_cli_summary, flags={"options": "--set"}),
)
