"""How a result file is described: its variables, their dimensions and what they mean.

Each analysis declares its own :class:`Schema` next to its code (``ANALYSIS = Analysis(schema=...)``,
:mod:`memloc.core.registry`); :class:`memloc.core.results.Result` checks datasets against it on
creation and on load, and the docs' results reference is generated from every declared schema when
the site is built (:func:`memloc.core.registry.markdown`, docs/hooks.py). The pieces several schemas share are here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SCHEMA_VERSION", "Var", "Schema", "SUBSETS", "LM_SUBSETS", "GRADIENT_PARTS", "layer_vars", "SUBSET_VAR",
           "EXAMPLE_VAR", "SCORE_NAMES"]

SCHEMA_VERSION = 2
SUBSETS = ("clean", "noisy", "noisy_true", "test")   # accuracy subsets of memloc.core.evaluate.accuracies
#: the subsets of a language model's run (memloc.core.tasks.SequenceTask): memorised share of clean training
#: sequences and of targets, suffix token accuracy of clean and held-out ones, held-out suffixes reproduced
LM_SUBSETS = ("clean", "noisy", "clean_tokens", "test_tokens", "test")
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


def layer_vars(dim: str = "layer") -> dict[str, Var]:
    return {dim: Var((dim,), "layer name (memloc.core.units.trace)"),
            "layer_kind": Var((dim,), "conv | linear | embedding | attention | norm | param"),
            "layer_numel": Var((dim,), "parameters in the layer")}


SUBSET_VAR = {"subset": Var(("subset",), "classifiers: accuracy on clean, noisy (given labels), noisy_true (true "
                                        "labels), test; language models: exactly memorised share of clean and noisy "
                                        "(the targets) training sequences, suffix token accuracy of clean_tokens and "
                                        "test_tokens, test (held-out suffixes reproduced)")}
EXAMPLE_VAR = {"example": Var(("example",), "training example id (0..N-1, the row of run.h5 /examples)")}
SCORE_NAMES = ("final_loss", "confidence", "variability", "forgetting", "el2n", "grand", "aum", "neuron_count", "tracin")
