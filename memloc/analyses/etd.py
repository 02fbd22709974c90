"""The example-tied dropout analysis: a run (or model) with dropout layers evaluated in each mode.

``memloc.evaluate_dropout(run_or_model, data=None, *, checkpoint=None, recalibrate_bn=False)``
(command: ``python -m memloc dropout RUN``). The dropout layers themselves live in
:mod:`memloc.dropout`.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..core.dropout import EVAL_MODES, evaluate_modes, require_dropout_layers
from ..core.evaluate import SUBSETS
from ..core.results import Result
from ..core.runtime import check_range
from ..core.selection import resolve

__all__ = ["evaluate_dropout"]


def evaluate_dropout(source, data=None, *, checkpoint: int | None = None, modes=EVAL_MODES,
                     eval_batch_size: int = 1024, recalibrate_bn: bool = False, device="auto") -> Result:
    """:func:`evaluate_modes` of a run trained with dropout layers (or of such a model with ``data``).

    ``checkpoint``: the run's epoch (default final). Returns the ``"dropout"`` result: ``accuracy``
    (mode, subset) and per-layer ``layer_kind``, ``units``, ``gen_units``.
    """
    check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    src = resolve(source, data, device=device, checkpoint=checkpoint)
    spec = src.run.info.get("model", {}).get("etd", {}) if src.run is not None else {}
    layers = require_dropout_layers(src.model)
    acc = evaluate_modes(src.model, src.data, modes=modes, batch_size=eval_batch_size, recalibrate_bn=recalibrate_bn)
    ds = xr.Dataset({"accuracy": (("mode", "subset"), acc),
                     "layer_kind": (("layer",), [l.kind for l in layers.values()]),
                     "units": (("layer",), np.array([l.units_seen or 0 for l in layers.values()], dtype=np.int64)),
                     "gen_units": (("layer",), np.array([l.n_gen(l.units_seen or 0) for l in layers.values()],
                                                        dtype=np.int64))},
                    coords={"mode": list(modes), "subset": list(SUBSETS), "layer": list(layers)})
    config = {"checkpoint": src.checkpoint, "eval_batch_size": eval_batch_size, "recalibrate_bn": recalibrate_bn,
              "etd": spec, "device": str(src.device)}
    return Result("dropout", ds, config=config)
