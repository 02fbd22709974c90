"""Gradient accounting per layer: how much do clean and mislabeled examples pull on each layer?

``python -m memloc.gradients RUN [--epochs all] [--layers ...] [--bn-mode eval|train]``

For every checkpoint epoch and every layer, with ``g_c`` the gradient of the mean cross-entropy
over the *clean* training examples, ``g_n`` over the *noisy* ones (w.r.t. their given labels)
and ``g = (n_c g_c + n_n g_n) / N`` the gradient of the mean over all training examples:

* ``norm_clean = ||g_c|| / sqrt(numel)``, ``norm_noisy``, ``norm_total`` likewise (numel = the
  layer's parameter count, so layers of different sizes are comparable);
* ``cosine = <g_c, g_n> / (||g_c|| ||g_n||)`` (NaN when either is zero).

One forward and two backward passes per batch (the clean part with ``retain_graph``, then the
noisy part). Norm layers run in eval mode (running statistics) by default; ``--bn-mode train``
uses batch statistics (on a copy of the model, so no running statistic changes). Weight decay
is not part of the loss.

Writes ``RUN/results/gradients.h5``: ``/epochs`` (E,), ``/layers/{names,kinds,numel}`` (L,),
``/norm_clean``, ``/norm_noisy``, ``/norm_total``, ``/cosine`` (E, L) with dims ``[epoch, layer]``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cli
from .data import ExampleSet
from .dropout import auto_as_test
from .layers import add_layer_args, setup, table, write_results
from .units import NORM_TYPES, Layer, eval_mode

__all__ = ["QUANTITIES", "BN_MODES", "layer_gradients", "gradients", "parse_args", "main"]

QUANTITIES = ("norm_clean", "norm_noisy", "norm_total", "cosine")
BN_MODES = ("eval", "train")


@contextlib.contextmanager
def _in_mode(model: nn.Module, bn_mode: str):
    """``model`` in eval mode, or a copy with its norm layers in train mode (``bn_mode="train"``)."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    if bn_mode == "train":
        model = copy.deepcopy(model).eval()  # batch statistics would update the caller's running stats
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                m.train()
        with auto_as_test(model):
            yield model
        return
    with eval_mode(model):
        yield model


def layer_gradients(model: nn.Module, examples: ExampleSet, is_noisy, layers: Sequence[Layer], *,
                    batch_size: int = 1024, bn_mode: str = "eval") -> dict[str, np.ndarray]:
    """Per-layer norms of the clean / noisy / total mean-loss gradients and their cosine.

    Parameters
    ----------
    model : classifier whose parameters of ``layers`` require grad (its ``.grad`` fields and, with
        ``bn_mode="train"``, its running statistics are left untouched).
    examples : the training examples, labels ``y`` = the given (possibly wrong) labels.
    is_noisy : (N,) bool, indexed by example id (``examples.idx``).
    layers : the layers to report (from :func:`memloc.units.trace`).
    bn_mode : ``eval`` (running statistics) or ``train`` (batch statistics, batches in order).

    Returns
    -------
    ``{q: (L,) float64 array}`` for ``q`` in :data:`QUANTITIES`.
    """
    with _in_mode(model, bn_mode) as m:
        sums = _gradient_sums(m, examples, is_noisy, layers, batch_size)
    noisy_all = np.asarray(is_noisy, dtype=bool)[examples.idx.cpu().numpy()]
    n, n_noisy = len(noisy_all), int(noisy_all.sum())
    n_clean = n - n_noisy
    out = {q: np.full(len(layers), np.nan) for q in QUANTITIES}
    for j, layer in enumerate(layers):
        if not layer.params:  # e.g. a norm without affine parameters
            continue
        gc, gn = (torch.cat([g.flatten() for g in sums[part][layer.name]]).double()
                  for part in ("clean", "noisy"))
        root = max(layer.numel, 1) ** 0.5
        norm_c, norm_n = float(gc.norm()), float(gn.norm())
        if n_clean:
            out["norm_clean"][j] = norm_c / root
        if n_noisy:
            out["norm_noisy"][j] = norm_n / root
        out["norm_total"][j] = float((gc * (n_clean / n) + gn * (n_noisy / n)).norm()) / root
        if norm_c > 0 and norm_n > 0:
            out["cosine"][j] = float(gc @ gn) / (norm_c * norm_n)
    return out


def _gradient_sums(model, examples, is_noisy, layers, batch_size):
    """``{"clean"|"noisy": {layer name: [grad per parameter]}}`` of the mean clean / noisy loss."""
    state = dict(model.named_parameters())
    names = [(l.name, k) for l in layers for k in l.params]
    params = [state[k] for _, k in names]
    frozen = [k for _, k in names if not state[k].requires_grad]
    if frozen:
        raise ValueError(f"parameter {frozen[0]!r} does not require grad")
    noisy_by_id = torch.as_tensor(np.asarray(is_noisy, dtype=bool), device=examples.y.device)
    n_noisy = int(noisy_by_id[examples.idx].sum())
    counts = {"clean": len(examples) - n_noisy, "noisy": n_noisy}
    sums = {part: [torch.zeros_like(p) for p in params] for part in counts}
    for x, y, idx in cli.progress(examples.batches(batch_size), desc="gradients", unit="batch",
                                  total=-(-len(examples) // batch_size)):
        losses = F.cross_entropy(model(x), y, reduction="none")
        noisy = noisy_by_id[idx]
        parts = [(part, losses[mask].sum() / counts[part])
                 for part, mask in (("clean", ~noisy), ("noisy", noisy)) if mask.any()]
        for i, (part, loss) in enumerate(parts):  # two backward passes through one forward graph
            grads = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(parts), allow_unused=True)
            for acc, g in zip(sums[part], grads):
                if g is not None:
                    acc += g
    out = {part: {l.name: [] for l in layers} for part in counts}
    for part in counts:
        for (layer, _), g in zip(names, sums[part]):
            out[part][layer].append(g)
    return out


def gradients(run, epochs: Sequence[int], layers: Sequence[Layer], data, *, device="cpu",
              batch_size: int = 1024, bn_mode: str = "eval") -> dict[str, np.ndarray]:
    """:func:`layer_gradients` at every checkpoint in ``epochs`` -> ``{q: (E, L) array}``."""
    model = run.build_model().to(device)
    rows = []
    for epoch in cli.progress(epochs, desc="epochs", unit="epoch"):
        model.load_state_dict(run.checkpoint(epoch))
        rows.append(layer_gradients(model, data.train, data.is_noisy, layers,
                                    batch_size=batch_size, bn_mode=bn_mode))
    return {q: np.stack([r[q] for r in rows]) for q in QUANTITIES}


def parse_args(argv=None):
    p = cli.parser("memloc.gradients", "Per-layer gradient norms of the mean clean, noisy and total "
                   "training loss (divided by sqrt(#params of the layer)) and the cosine between the "
                   "clean and noisy gradients, at every chosen checkpoint. Writes RUN/results/gradients.h5.")
    p.add_argument("run", help="run directory (from python -m memloc.train)")
    add_layer_args(p, epochs_help="checkpoint epochs to analyse")
    p.add_argument("--bn-mode", choices=BN_MODES, default="eval",
                   help="norm layers use running statistics (eval) or batch statistics (train; "
                        "the checkpoints' running statistics are not changed)")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="examples per forward pass (with --bn-mode train also the statistics batch)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors("memloc.gradients"):
        cli.check_positive(args, "batch_size")
        s = setup(args.run, device=args.device, layers=args.layers, epochs=args.epochs)
        epochs = s.epochs
        res = gradients(s.run, epochs, s.layers, s.data, device=s.device, batch_size=args.batch_size,
                        bn_mode=args.bn_mode)
        config = {"epochs": epochs, "bn_mode": args.bn_mode, "batch_size": args.batch_size,
                  "loss": "cross_entropy mean", "normalisation": "norm / sqrt(numel)"}
        path = write_results(s, "gradients", config, argv,
                             {"epochs": (np.asarray(epochs, np.int64), ["epoch"]),
                              **{q: (res[q], ["epoch", "layer"]) for q in QUANTITIES}})
        shown = np.asarray(epochs) >= 2 if max(epochs) >= 2 else np.ones(len(epochs), bool)
        print(f"{path}: {len(epochs)} epochs x {len(s.layers)} layers; means over epochs "
              f"{', '.join(map(str, np.asarray(epochs)[shown])) if shown.sum() < 6 else '>= 2'}:")
        with np.errstate(all="ignore"):
            means = np.stack([np.nanmean(res[q][shown], axis=0) for q in QUANTITIES], axis=1)
        print(table(s.layers, QUANTITIES, means, fmt="10.3g"))
    return res


if __name__ == "__main__":
    main()
