"""The one definition of every result file: variables, their dimensions and what they mean.

:class:`memloc.core.results.Result` checks datasets against these on creation and on load, and the
README's "Results" section is generated from them (:func:`markdown`; a test keeps them equal).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SCHEMA_VERSION", "Var", "Schema", "SCHEMAS", "markdown", "SUBSETS", "GRADIENT_PARTS"]

SCHEMA_VERSION = 2
SUBSETS = ("clean", "noisy", "noisy_true", "test")   # accuracy subsets of memloc.core.evaluate.accuracies
GRADIENT_PARTS = ("clean", "noisy", "all")


@dataclass(frozen=True)
class Var:
    dims: tuple[str, ...]
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Schema:
    name: str
    doc: str
    coords: dict[str, Var]
    variables: dict[str, Var]
    attrs: dict[str, str] = field(default_factory=dict)   # variable attributes worth naming

    def check(self, ds) -> None:
        """:class:`MemlocError` unless ``ds`` has every required variable with its dims, nothing else."""
        from .errors import MemlocError
        spec = {**self.coords, **self.variables}
        for key, var in spec.items():
            if key not in ds.variables:
                if not var.optional:
                    raise MemlocError(f"result {self.name!r} lacks variable {key!r}")
                continue
            if tuple(ds[key].dims) != var.dims:
                raise MemlocError(f"result {self.name!r}: {key!r} has dims {tuple(ds[key].dims)}, "
                                  f"the schema says {var.dims}")
        extra = [k for k in ds.variables if k not in spec]
        if extra:
            raise MemlocError(f"result {self.name!r} has variables outside its schema: {', '.join(map(str, extra))}")


def _layer_coords(dim: str = "layer") -> dict[str, Var]:
    return {dim: Var((dim,), "layer name (memloc.core.units.trace)"),
            "layer_kind": Var((dim,), "conv | linear | embedding | attention | norm | param"),
            "layer_numel": Var((dim,), "parameters in the layer")}


_SUBSET = {"subset": Var(("subset",), "clean, noisy (given labels), noisy_true (true labels), test")}
_EXAMPLE = {"example": Var(("example",), "training example id (0..N-1, the row of run.h5 /examples)")}
_SCORES = ("final_loss", "confidence", "variability", "forgetting", "el2n", "grand", "aum", "neuron_count", "tracin")

SCHEMAS: dict[str, Schema] = {s.name: s for s in [
    Schema("gradients", "per-layer gradient accounting (memloc.gradients)",
           {"checkpoint": Var(("checkpoint",), "checkpoint epoch (-1: a model passed in directly)"), **_layer_coords(),
            "subset": Var(("subset",), "clean, noisy, all: whose mean loss the gradient is of")},
           {"norm": Var(("checkpoint", "layer", "subset"), "L2 norm of the gradient of the subset's mean loss / sqrt(layer_numel)"),
            "cosine": Var(("checkpoint", "layer"), "cosine between the clean and the noisy gradient (NaN if one is 0)")}),
    Schema("rewind", "one layer at a time put back to an earlier checkpoint (memloc.rewind)",
           {"checkpoint": Var(("checkpoint",), "epoch of the checkpoint the layer is rewound to"),
            **_layer_coords(), **_SUBSET},
           {"accuracy": Var(("checkpoint", "layer", "subset"), "accuracy with the layer rewound"),
            "baseline": Var(("subset",), "accuracy of the model itself")}),
    Schema("retrain", "one layer at a time reset and retrained alone on clean data (memloc.retrain)",
           {**_layer_coords(), "epoch": Var(("epoch",), "retraining epoch (0 = just after the reset)"), **_SUBSET},
           {"accuracy": Var(("layer", "epoch", "subset"), "accuracy while the layer is retrained"),
            "baseline": Var(("subset",), "accuracy of the model itself")}),
    Schema("flip", "greedy gradient-guided unit zeroing until the prediction flips (memloc.flip); at "
           "config site = weight the units are parameter items (a conv filter, or one element of any other "
           "parameter) and the layers are parameters",
           {**_EXAMPLE, "repeat": Var(("repeat",), "search repeat (own reference batch)"),
            "layer": Var(("layer",), "unit space (layer) name (weight site: parameter name)"), **_SUBSET},
           {"is_noisy": Var(("example",), "the example's given label is wrong"),
            "label": Var(("example",), "given label searched"),
            "status": Var(("example",), "0 = searched, 1 = misclassified by the model (not searched)"),
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
    Schema("scores", "per-example memorisation / label-noise scores (memloc.scores)",
           dict(_EXAMPLE),
           {name: Var(("example",), f"score {name} (see memloc.analyses.scores.SCORES)", optional=True) for name in _SCORES},
           {"direction": "+1: higher = more likely mislabeled, -1: lower is",
            "epoch": "checkpoint epoch (el2n, grand)"}),
    Schema("detect", "how well each score finds the mislabeled examples (memloc.detect)",
           {"score": Var(("score",), "score name"), "metric": Var(("metric",), "auroc, ap, prec_at_k")},
           {"values": Var(("score", "metric"), "each score over the examples where it is defined"),
            "direction": Var(("score",), "+1 / -1 (see scores)"),
            "size": Var(("score",), "examples where the score is defined"),
            "noisy": Var(("score",), "noisy examples among them"),
            "base_rate": Var(("score",), "noisy / size (the AP of chance)"),
            "common_values": Var(("score", "metric"), "every score on the examples where all are defined", optional=True),
            "common_example": Var(("common",), "ids of those examples", optional=True)}),
    Schema("dropout", "example-tied dropout evaluated per mode (memloc.dropout)",
           {"mode": Var(("mode",), "train, test, drop"), **_SUBSET,
            "layer": Var(("layer",), "module the dropout layer follows")},
           {"accuracy": Var(("mode", "subset"), "accuracy with every dropout layer in the mode (train: test is NaN)"),
            "layer_kind": Var(("layer",), "example_tied | standard | fixed"),
            "units": Var(("layer",), "units of the layer"),
            "gen_units": Var(("layer",), "generalisation units (always kept)")}),
    Schema("agreement", "Spearman rank agreement between scores and across runs (memloc.score_agreement)",
           {"score": Var(("score",), "score name"), "score_b": Var(("score_b",), "score name (the same list)")},
           {"between": Var(("score", "score_b"), "Spearman correlation of direction x score between the two "
                           "scores (examples finite in both), mean over runs; > 0: they flag the same examples"),
            "across_runs": Var(("score",), "Spearman correlation of the score between two runs, mean over "
                               "run pairs (NaN with one run)"),
            "pairs": Var(("score",), "run pairs in that mean (those with a defined correlation)")}),
    Schema("issues", "every training example ranked by suspicion, the suspects flagged, no ground truth used "
           "(memloc.find_label_issues)",
           {**_EXAMPLE, "score": Var(("score",), "score name (memloc.scores)")},
           {"rank": Var(("example",), "1 = most suspicious"),
            "flagged": Var(("example",), "1 = among the round(rate_estimate x N) most suspicious"),
            "label_given": Var(("example",), "label trained on"),
            "label_predicted": Var(("example",), "argmax of the epoch-k probabilities (averaged over runs): the relabelling candidate"),
            "prob_given": Var(("example",), "epoch-k probability of the given label"),
            "suspicion": Var(("example",), "the ranking value (higher = more suspicious)"),
            "scores": Var(("example", "score"), "every score, raw (averaged over runs)"),
            "direction": Var(("score",), "+1: higher = more likely mislabeled, -1: lower is"),
            "rate_estimate": Var((), "estimated noise rate (calibrated confident joint) or the rate given")}),
    Schema("prune", "test accuracy of fresh runs trained on pruned training sets (memloc.prune)",
           {"score": Var(("score",), "score that chose the kept examples, or random"),
            "keep": Var(("keep",), "fraction of the training set kept"), "seed": Var(("seed",), "training seed")},
           {"test_accuracy": Var(("score", "keep", "seed"), "final test accuracy of the run on the kept examples"),
            "noisy_kept": Var(("score", "keep", "seed"), "share of the noisy examples that were kept (NaN without noise)"),
            "noisy_share": Var(("score", "keep", "seed"), "share of the kept examples that are noisy"),
            "full_accuracy": Var(("seed",), "final test accuracy trained on every example")}),
    Schema("clean", "drop (or relabel) flagged examples and retrain: test accuracy before / after (memloc.clean)",
           {"flags": Var(("flags",), "all (no cleaning), memloc (find_label_issues flags), cleanlab (baseline)"),
            "seed": Var(("seed",), "training seed")},
           {"test_accuracy": Var(("flags", "seed"), "final test accuracy"),
            "flagged": Var(("flags",), "examples flagged"),
            "precision": Var(("flags",), "flagged that are noisy (NaN without ground truth)"),
            "recall": Var(("flags",), "noisy that are flagged (NaN without ground truth)"),
            "noise_left": Var(("flags",), "share of the training set still mislabeled after cleaning (NaN without ground truth)")}),
    Schema("jtt", "just train twice: the identification model's error set upweighted, retrained (memloc.jtt)",
           {"variant": Var(("variant",), "erm (plain retraining), jtt (error set upweighted)"),
            "seed": Var(("seed",), "training seed"),
            "group": Var(("group",), "test, worst_class (worst per-class test accuracy), clean (training, given = true), "
                                      "noisy_given (memorised), noisy_true (noisy examples w.r.t. true labels)")},
           {"accuracy": Var(("variant", "seed", "group"), "final accuracy on the group"),
            "error_set": Var(("error",), "ids of the identification model's misclassified training examples"),
            "error_set_noisy": Var((), "share of the error set that is noisy (NaN without ground truth)")}),
    Schema("importance", "per-layer and per-unit parameter importance, Fisher (EWC) or MAS (memloc.importance)",
           {**_layer_coords(), "subset": Var(("subset",), "examples the importance is of: clean, noisy, all, flagged, class:C, ids:..."),
            "unit": Var(("unit",), "global unit id (as in flip)"), "unit_layer": Var(("unit",), "the unit's layer")},
           {"layer_importance": Var(("subset", "layer"), "mean importance per parameter of the layer"),
            "unit_importance": Var(("subset", "unit"), "mean importance of the parameters producing the unit (NaN: the logits layer)"),
            "examples": Var(("subset",), "examples in the subset"),
            "flip_overlap": Var((), "Jaccard overlap of flip's zeroed units (noisy examples) and as many top noisy-importance units", optional=True),
            "flip_units": Var(("zeroed",), "units flip zeroed for noisy examples", optional=True)}),
    Schema("unlearn", "memorised labels removed from the trained model, per method (memloc.unlearn)",
           {"technique": Var(("technique",), "unlearning method"), "seed": Var(("seed",), "seed (batch order)"),
            "group": Var(("group",), "forget_given (memorisation left), forget_true, retain, test")},
           {"accuracy": Var(("technique", "seed", "group"), "accuracy after unlearning"),
            "baseline": Var(("group",), "accuracy of the trained model"),
            "seconds": Var(("technique", "seed"), "wall time of the method"),
            "passes": Var(("technique",), "passes over the training data (forward+backward epochs, importance passes included)"),
            "forget": Var(("forget",), "ids of the forget set")}),
    Schema("forgetting", "within-task forgetting: train on one part, then the other (memloc.forgetting_order)",
           {"order": Var(("order",), "random, forgettable_first, unforgettable_first"),
            "protect": Var(("protect",), "none, ewc, mas, lwf: how the first part is protected in the second phase"),
            "epoch": Var(("epoch",), "0 = initialisation, 1..E first phase, E+1..2E second phase"),
            "part": Var(("part",), "first, second")},
           {"accuracy": Var(("order", "protect", "epoch", "part"), "accuracy on the part (given labels)"),
            "size": Var(("order", "part"), "examples in the part")}),
]}


def markdown() -> str:
    """The README's description of every result file, generated from :data:`SCHEMAS`."""
    out = []
    for s in SCHEMAS.values():
        out.append(f"#### `results/{s.name}.h5`: {s.doc}\n")
        out.append("| variable | dims | meaning |\n|---|---|---|")
        for key, var in {**s.coords, **s.variables}.items():
            kind = "coord" if key in s.coords else ("optional" if var.optional else "")
            out.append(f"| `{key}`{' (' + kind + ')' if kind else ''} | ({', '.join(var.dims)}) | {var.doc} |")
        for key, doc in s.attrs.items():
            out.append(f"| attribute `{key}` | | {doc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
