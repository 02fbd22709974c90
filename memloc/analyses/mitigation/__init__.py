"""Mitigation, after TinyMem (Sakarvadia et al., ICLR 2025): remove ALL memorised targets of a language
model at once while keeping the rest.

``memloc.mitigate(source, data=None, *, methods=METHODS, fractions=(0.01,))`` (command:
``memloc mitigate RUN``): the targets are the memorisation targets (noisy TinyMem sequences, canaries)
the model reproduces (greedy decoding gives their suffix); each method (:mod:`.methods`: TinyMem's
BalancedSubnet and Subnet, MemPi's neuron localisation methods zeroing their top neurons, memloc's
greedy zeroing of neurons or of single weights, fine-tuning on clean data, and fine-tuning followed by
the greedy weight zeroing; ``sinks``, chosen by name: a run
trained with memorisation sinks with them dropped) edits a fresh copy of the
model, once per fraction (the share of neurons or weights it may change; fine-tuning: once), and the
copy is measured on every sequence.

The ``"mitigation"`` result, per setting (a method at a fraction): the share of ALL memorisation targets
still reproduced (TinyMem's "% memorised"), of the other (clean) training sequences (the reference
sequences the methods keep are among them), the held-out
(test) suffix loss and token accuracy and, for TinyMem data, the rule accuracy (share of test sequences
whose rule continuation is reproduced exactly); each before (scalars) and after; the method's seconds
(its edit alone, not the measurements) and the units it changed. The learned masks of ``balanced_subnet``
keep the loss of ``ref_batch_size`` clean training sequences low, as does the greedy neuron search (the
greedy weight search: a new batch of that many clean sequences each step, every one in turn); IG and
the learned neuron masks score every target separately (:func:`memloc.neuron_scores`).

``units="heads"``: the methods that rank and zero units (:data:`.methods.UNIT_METHODS`: the localisation
methods and ``greedy``) rank and zero attention heads instead of MLP neurons (``fraction``: the share of
each layer's heads, at least one; greedy's budget the share of all heads); the others edit MLP weights or
every weight and are refused with heads. The config records ``units``.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import xarray as xr

from ...core.errors import MemlocError
from ...core.lm import sequence_measures
from ...core.neurons import unit_layers
from ...core.options import add_precision, nonnegative_int, number, positive_int
from ...core.precision import check_precision
from ...core.registry import Analysis, Command
from ...core.results import Result
from ...core.runtime import check_choices, check_range
from ...core.schemas import Schema, Var
from ...core.store import stored
from ...core.selection import lm_source
from ..deletion import check_fractions
from ..localise import parse_settings, reference_rows
from ..localise.methods import check_localised_units
from .methods import (CHOICES, FUNCTIONS, HYPER, METHODS, NO_FRACTION, UNIT_METHODS, Task, check_method_units,
                      check_sinks, default_methods, mitigation_options)
from .plots import plot_mitigation

__all__ = ["mitigate", "METHODS", "HYPER"]


def _measures(model, data, target_rows, eval_batch_size: int, precision: str = "fp32") -> dict:
    """Memorised share of the targets / the clean training sequences, the test measures, per-target flags."""
    p, s = data.prefix_len, data.suffix_len
    train = sequence_measures(model, data.tokens, p, s, eval_batch_size=eval_batch_size, precision=precision)["memorised"]
    test = sequence_measures(model, data.test_tokens, p, s, eval_batch_size=eval_batch_size, precision=precision)
    tinymem = str(data.name).startswith("tinymem")
    return {"targets_memorised": float(train[data.is_memorised_target].mean()),
            "others_memorised": float(train[~data.is_memorised_target].mean()) if (~data.is_memorised_target).any()
            else float("nan"),
            "test_loss": float(test["suffix_loss"].mean()), "test_accuracy": float(test["suffix_accuracy"].mean()),
            "rule_accuracy": float(test["memorised"].mean()) if tinymem else float("nan"),
            "memorised": train[target_rows]}


@stored("mitigation")
def mitigate(source, data=None, *, methods=None, fractions=(0.01,), options: dict | None = None,
             ref_batch_size: int = 64, checkpoint: int | None = None, eval_batch_size: int = 64, seed: int = 0,
             device="auto", precision: str = "fp32", units: str = "mlp") -> Result:
    """The ``"mitigation"`` result (module docstring) of a language-model run (``checkpoint`` default
    final) or a causal LM module with ``data`` (a SequenceSet, with test sequences): every method of
    ``methods`` (None: :data:`METHODS`, with heads the unit methods) at every fraction of ``fractions``
    (in (0, 1]) removes all memorised targets at once. ``units``: what the unit methods rank and zero,
    ``"mlp"`` neurons or attention ``"heads"`` (module docstring).
    ``options``: {method: {name: value}} over :data:`HYPER` and the localisation methods' settings.
    ``precision``: every forward pass (measures, methods, fine-tuning and mask learning, their fp16 loss
    scaled) under autocast (:mod:`memloc.core.precision`)."""
    check_localised_units(units)
    chosen = check_choices("methods", default_methods(units) if methods is None else methods, CHOICES,
                           "mitigation method")
    check_method_units(chosen, units)
    fracs = check_fractions(fractions)
    opts = mitigation_options(options)
    ref_batch_size = check_range("ref_batch_size", ref_batch_size, low=0, integer=True)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    seed = check_range("seed", seed, low=0, integer=True)
    check_precision(precision)
    model, data, epoch = lm_source(source, data, checkpoint=checkpoint, device=device, analysis="mitigate")
    unit_layers(model, units)                   # a model without heads is refused before any work
    if not len(data.test_tokens):
        raise MemlocError(f"data {data.name!r} has no test sequences: mitigation measures the held-out loss",
                          argument="data")
    if "sinks" in chosen:
        check_sinks(model, repr(str(getattr(source, "path", source))) if not isinstance(source, torch.nn.Module)
                    else "the model")
    p, s = data.prefix_len, data.suffix_len
    dev = next(model.parameters()).device
    check_precision(precision, dev)
    before = _measures(model, data, slice(None), eval_batch_size, precision)
    rows = np.flatnonzero(before["memorised"] & data.is_memorised_target)
    if not len(rows):
        raise MemlocError("the model reproduces none of its memorisation targets at this checkpoint, so there is "
                          "nothing to mitigate: train it longer or pass a later checkpoint", argument="source")
    all_targets = np.flatnonzero(data.is_memorised_target)
    ref = reference_rows(data, ref_batch_size, exclude=rows, seed=seed)
    clean_all = data.tokens[torch.as_tensor(np.flatnonzero(~data.is_memorised_target), dtype=torch.int64)].to(dev)
    settings = [(m, float("nan")) for m in chosen if m in NO_FRACTION]
    settings = [(m, f) for m in chosen if m not in NO_FRACTION for f in fracs] + settings
    settings.sort(key=lambda mf: chosen.index(mf[0]))
    keys = ("targets_memorised", "others_memorised", "test_loss", "test_accuracy", "rule_accuracy")
    out = {k: np.full(len(settings), np.nan) for k in (*keys, "seconds")}
    out["changed"] = np.zeros(len(settings), dtype=np.int64)
    out["memorised"] = np.zeros((len(settings), len(rows)), dtype=bool)
    for i, (method, fraction) in enumerate(settings):
        t = Task(copy.deepcopy(model).eval(), data.tokens[torch.as_tensor(all_targets)][:, :p + s].to(dev),
                 torch.from_numpy(np.isin(all_targets, rows)).to(dev),
                 data.tokens[torch.as_tensor(ref, dtype=torch.int64)][:, :p + s].to(dev), clean_all, p, s,
                 eval_batch_size, seed, precision, units)
        start = time.perf_counter()
        out["changed"][i] = FUNCTIONS[method](t, opts[method], fraction)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out["seconds"][i] = time.perf_counter() - start
        after = _measures(t.model.eval(), data, rows, eval_batch_size, precision)
        for key in keys:
            out[key][i] = after[key]
        out["memorised"][i] = after["memorised"]
    variables = {key: ("setting", value) for key, value in out.items() if key != "memorised"}
    variables["memorised"] = (("setting", "target"), out["memorised"])
    variables.update({f"{key}_before": ((), before[key]) for key in keys})
    variables["method"] = ("setting", np.asarray([m for m, _ in settings], dtype=str))
    variables["fraction"] = ("setting", np.asarray([f for _, f in settings], dtype=np.float64))
    coords = {"setting": np.asarray([m if np.isnan(f) else f"{m}@{f:g}" for m, f in settings], dtype=str),
              "target": np.asarray(data.ids[rows], dtype=np.int64)}
    config = {"methods": chosen, "fractions": fracs, "options": {m: opts[m] for m in chosen}, "prefix_len": p,
              "suffix_len": s, "reference": [int(i) for i in data.ids[ref]], "checkpoint": epoch,
              "eval_batch_size": eval_batch_size, "seed": seed, "device": str(dev), "data": data.name,
              "precision": precision, "units": units}
    return Result("mitigation", xr.Dataset(variables, coords=coords), config=config)


# The declaration: command line and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods; default all of {', '.join(METHODS)}; also sinks (a run trained "
                        "with memorisation sinks, train --etd-after mlp: its sinks dropped at test time); with --units "
                        f"heads: default all of {', '.join(UNIT_METHODS)}")
    p.add_argument("--fractions", default="0.01",
                   help="comma-separated shares in (0, 1] of the neurons or heads (per layer) or MLP weights a method "
                        "may change; each method runs once per fraction (fine_tune once)")
    p.add_argument("--units", default="mlp", choices=("mlp", "heads"),
                   help="what the localisation methods and greedy rank and zero: MLP hidden neurons (mlp, default) or "
                        "attention heads (heads: a head's slice of the attention output before the output projection)")
    p.add_argument("--checkpoint", type=nonnegative_int, default=None, help="checkpoint epoch (default: final)")
    p.add_argument("--eval-batch-size", type=positive_int, default=64, help="sequences per forward pass")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method's setting (memloc.analyses.mitigation.HYPER or the localisation methods'), e.g. "
                        "balanced_subnet.epochs=20; repeat for several")
    p.add_argument("--ref-batch-size", type=nonnegative_int, default=64,
                   help="clean training sequences whose loss BalancedSubnet and greedy keep low (greedy_weights and "
                        "fine_tune_greedy: a new batch of this many each step, every clean sequence in turn)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="random stream of every method")
    add_precision(p, what="every forward pass (fp16 mask learning and fine-tuning with a scaled loss)")


def _cli_execute(args):
    return mitigate(args.run, methods=args.methods, fractions=args.fractions, options=parse_settings(args.set),
                    checkpoint=args.checkpoint, ref_batch_size=args.ref_batch_size,
                    eval_batch_size=args.eval_batch_size, seed=args.seed, device=args.device, precision=args.precision,
                    units=args.units)


def _cli_summary(res, args):
    acc0 = float(res["test_accuracy_before"])
    lines = [f"{res.sizes['target']} memorised target(s); before: {float(res['targets_memorised_before']):.1%} of the "
             f"targets memorised, held-out token accuracy {acc0:.2%}"
             + ("; the unit methods zeroed attention heads" if res.config.get("units") == "heads" else ""),
             f"{'setting':<24} {'targets':>8} {'others':>8} {'accuracy':>9} {'seconds':>8}"]
    for i, name in enumerate(res["setting"].values):
        lines.append(f"{str(name):<24} {res['targets_memorised'].values[i]:8.1%} {res['others_memorised'].values[i]:8.1%}"
                     f" {res['test_accuracy'].values[i]:9.2%} {res['seconds'].values[i]:8.2f}")
    return "\n".join(lines)


_S = ("setting",)

ANALYSIS = Analysis(
    name="mitigation", order=161, compute=mitigate, plot=plot_mitigation,
    schema=Schema("mitigation", "removing all memorised targets of a language model at once, by each method "
                  "(memloc.mitigate)",
  {"setting": Var(_S, "a method at a fraction: method@fraction (fine_tune: its name)"),
   "target": Var(("target",), "sequence id of a memorised target (memorised before)")},
  {"method": Var(_S, "balanced_subnet | subnet | hard_concrete | slimming | zero_out | ig | activations | grad_x_act "
                     "| greedy | greedy_weights | fine_tune_greedy | random | fine_tune | sinks"),
   "fraction": Var(_S, "share of each layer's neurons (config units heads: heads) / each MLP matrix's weights the "
                       "method may change (NaN: none)"),
   "targets_memorised": Var(_S, "share of all memorisation targets reproduced after"),
   "others_memorised": Var(_S, "share of the other (clean) training sequences reproduced after"),
   "test_loss": Var(_S, "mean suffix loss of the test sequences after"),
   "test_accuracy": Var(_S, "mean suffix token accuracy of the test sequences after"),
   "rule_accuracy": Var(_S, "share of test sequences whose rule continuation is reproduced (NaN: not TinyMem)"),
   "seconds": Var(_S, "seconds of the method's edit"),
   "changed": Var(_S, "neurons (config units heads: heads) or weights zeroed (fine_tune_greedy: after its "
                      "fine-tuning; fine_tune: epochs run; sinks: sink neurons dropped)"),
   "memorised": Var(("setting", "target"), "the target is still reproduced after"),
   "targets_memorised_before": Var((), "share of all memorisation targets reproduced before"),
   "others_memorised_before": Var((), "share of the other training sequences reproduced before"),
   "test_loss_before": Var((), "mean suffix loss of the test sequences before"),
   "test_accuracy_before": Var((), "mean suffix token accuracy of the test sequences before"),
   "rule_accuracy_before": Var((), "rule accuracy before (NaN: not TinyMem)")}),
    command=Command(
        name="mitigate", group="acting", example="memloc mitigate RUN --methods greedy_weights,balanced_subnet",
        help="remove all memorised sequences of a language model at once (TinyMem's BalancedSubnet "
                              "and Subnet, neuron zeroing by each localisation method, memloc's greedy, fine-tuning, "
                              "and fine-tuning then greedy weight zeroing)",
        description="Every method edits a copy of the model so that it no longer reproduces any of its memorised "
                    "targets while keeping the other sequences; reports the memorised shares, the held-out loss, "
                    "token and rule accuracy before and after, and seconds. Writes RUN/results/mitigation.h5.",
        unsplit="each method is one joint edit of the model over all memorised targets at once, not independent "
                "per-target work, so every process would repeat it",
        arguments=_cli_arguments, execute=_cli_execute, summary=_cli_summary, flags={"options": "--set"}),
)
