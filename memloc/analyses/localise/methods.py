"""The array-level core: every method's neuron scores for target token sequences of a model."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ...core.errors import MemlocError
from ...core.neurons import check_units, unit_layers
from ...core.precision import autocast, check_precision
from ...core.runtime import check_choices, check_range
from ...core.sequences import check_span
from .activations import activations
from .common import HYPER, METHODS, Targets, greedy_budget
from .greedy import grad_x_act, greedy
from .ig import ig
from .masks import hard_concrete, slimming
from .zero_out import zero_out

__all__ = ["neuron_scores", "method_options", "check_settings", "resolved_options", "check_localised_units",
           "FUNCTIONS"]


def random(t: Targets, opts: dict) -> torch.Tensor:
    """(B, L, d) float64 uniform scores, each row drawn from its own stream (:meth:`Targets.row_seed`): the baseline."""
    return torch.from_numpy(np.stack([np.random.default_rng(t.row_seed(i)).random(t.shape[1:])
                                      for i in range(len(t.tokens))]))


FUNCTIONS = {"zero_out": zero_out, "activations": activations, "ig": ig, "slimming": slimming,
             "hard_concrete": hard_concrete, "grad_x_act": grad_x_act, "greedy": greedy, "random": random}


def _token_ids(tokens, argument: str) -> torch.Tensor:
    try:
        tokens = torch.as_tensor(tokens if torch.is_tensor(tokens) else np.asarray(tokens))
    except (TypeError, ValueError, RuntimeError):
        raise MemlocError(f"{argument} must be (B, T) integer token ids, got {type(tokens).__name__}",
                          argument=argument) from None
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool or not len(tokens):
        raise MemlocError(f"{argument} has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; give (B, T) integer "
                          "token ids, B >= 1", argument=argument)
    if tokens.numel() and int(tokens.min()) < 0:
        raise MemlocError(f"{argument} holds a negative token id", argument=argument)
    return tokens.long()


def check_localised_units(units) -> str:
    """``units`` localisation ranks: ``mlp`` or ``heads`` (one kind per result: the scores are (layer, unit)
    arrays of one width), else a one-line :class:`MemlocError`."""
    if units in ("both", "outputs"):
        raise MemlocError(f"units {units!r}: neuron localisation ranks one kind of unit at a time (a layer's units "
                          "share one width): use {units}, then heads", options={"units": "mlp"},
                          argument="units")
    return check_units(units, ("mlp", "heads"))


def check_settings(method: str, values, defaults: dict) -> None:
    """A one-line :class:`MemlocError` unless ``values`` is a dict of settings of ``method`` named in
    ``defaults``, each of its default's kind: a whole number >= 1 where the default is an int (steps, epochs,
    batch sizes), a finite number >= 0 where it is a float (rates, weights, penalties); other settings are
    checked where they are read."""
    if not isinstance(values, dict):
        raise MemlocError(f"options for {method!r} must be a dict {{name: value}}, got {type(values).__name__}",
                          argument="options")
    bad = sorted(set(values) - set(defaults))
    if bad:
        raise MemlocError(f"options for {method} has no {bad[0]!r}; valid: {', '.join(defaults) or 'none'}",
                          argument="options")
    for name, value in values.items():
        default = defaults.get(name)
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if isinstance(default, int) and not (number and float(value).is_integer() and value >= 1):
            raise MemlocError(f"options for {method}: {name} must be a whole number >= 1, not {value!r}",
                              argument="options")
        if isinstance(default, float) and not (number and np.isfinite(value) and value >= 0):
            raise MemlocError(f"options for {method}: {name} must be a finite number >= 0, not {value!r}",
                              argument="options")


def method_options(options: dict | None) -> dict[str, dict]:
    """:data:`HYPER` with ``options`` ({method: {name: value}}) laid over it; unknown names are errors."""
    merged = {m: dict(v) for m, v in HYPER.items()}
    if options is not None and not isinstance(options, dict):
        raise MemlocError(f"options must be a dict {{method: {{name: value}}}}, got {type(options).__name__}",
                          argument="options")
    for method, values in (options or {}).items():
        if method not in HYPER:
            raise MemlocError(f"options names no localisation method {method!r}; valid: {', '.join(METHODS)}",
                              argument="options")
        check_settings(method, values, HYPER[method])
        merged[method].update(values)
    carry = merged["greedy"]["min_zeroed"]
    if carry != "auto" and (isinstance(carry, bool) or not isinstance(carry, (int, np.integer)) or carry < 0):
        raise MemlocError(f"greedy's min_zeroed {carry!r}: give auto (carry on to the top_k x layers the ranking is "
                          "read at) or a count >= 0 (0: stop at the break)", argument="options")
    return merged


def resolved_options(options: dict | None, methods, n_layers: int, d: int, top_k: int | None = None) -> dict:
    """{method: settings} of ``methods`` as they run (:func:`method_options`), greedy's ``min_zeroed`` as the count
    it carries on to (:func:`memloc.analyses.localise.common.greedy_budget`): what results record."""
    opts = method_options(options)
    opts["greedy"]["min_zeroed"] = greedy_budget(opts["greedy"]["min_zeroed"], n_layers, d, top_k)
    return {m: opts[m] for m in methods}


def neuron_scores(model: nn.Module, tokens, prefix_len: int, suffix_len: int, *, methods=METHODS,
                  reference=None, options: dict | None = None, eval_batch_size: int = 64, seed: int = 0,
                  precision: str = "fp32", units: str = "mlp", ids=None, top_k: int | None = None) -> dict:
    """Scores of every MLP neuron (``units="mlp"``) or attention head (``units="heads"``,
    :func:`memloc.core.neurons.attention_heads`) of ``model`` for each target sequence (row of ``tokens`` (B, T), on
    the model's device): higher = more responsible for the target's suffix
    ``tokens[:, prefix_len:prefix_len + suffix_len]`` given its prefix.

    Returns ``{"scores": {method: (B, L, d) float64 array}, "seconds": {method: float},
    "layers": [down- / output projection names], "greedy_zeroed": (B,), "greedy_broken": (B,)}`` (the last two
    with ``greedy``). The model runs in eval mode (its mode is restored) with its own weights.
    ``reference``: (R, T') token ids (T' >= prefix_len + suffix_len) of sequences whose suffix loss
    ``greedy`` keeps low (e.g. clean training sequences; None: the target's loss alone).
    ``options``: {method: {hyper-parameter: value}} over :data:`HYPER`. ``precision``: every method's
    forward passes under autocast (:mod:`memloc.core.precision`); the learned masks' fp16 loss is scaled.
    ``ids``: (B,) integer keys in [0, 2**32) of the rows' random streams (``random``, ``hard_concrete``: row i
    draws from seed ``seed + 2**32 ids[i]``, whatever the other rows; None: 0 .. B-1), e.g. the sequence ids.
    ``top_k``: the units per layer the rankings will be read at (INJ: the neurons injected; None: 1% of a
    layer's): greedy's default (``min_zeroed="auto"``) carries its search on past the break until it has
    zeroed ``top_k`` x layers units, so that it orders them itself.
    """
    chosen = check_choices("methods", methods, METHODS, "localisation method")
    check_localised_units(units)
    method_options(options)
    if top_k is not None:
        top_k = check_range("top_k", top_k, low=1, integer=True)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    check_precision(precision)
    tokens = _token_ids(tokens, "tokens")
    check_span(prefix_len, suffix_len, tokens.shape[1])
    if reference is not None:
        reference = _token_ids(reference, "reference")
        if reference.shape[1] < prefix_len + suffix_len:
            raise MemlocError(f"reference sequences have {reference.shape[1]} tokens, fewer than prefix_len + "
                              f"suffix_len = {prefix_len + suffix_len}", argument="reference")
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (len(tokens),) or ids.dtype.kind not in "iu" or (ids < 0).any() or (ids >= 2**32).any():
            raise MemlocError(f"ids must be {len(tokens)} integers in [0, 2**32) (one per row of tokens), got "
                              f"shape {ids.shape} of {ids.dtype}", argument="ids")
    layers = unit_layers(model, units)
    if len({layer.size for layer in layers}) > 1:
        raise MemlocError(f"the {units} layers of {type(model).__name__} differ in width "
                          f"({sorted({layer.size for layer in layers})}); give a model whose layers have one width",
                          argument="source")
    opts = resolved_options(options, chosen, len(layers), layers[0].size, top_k)
    device = next(model.parameters()).device
    check_precision(precision, device)
    span = prefix_len + suffix_len
    t = Targets(model, layers, tokens[:, :span].to(device), int(prefix_len), int(suffix_len), int(eval_batch_size),
                int(seed), None if reference is None else reference[:, :span].to(device), precision, ids)
    out = {"scores": {}, "seconds": {}, "layers": [layer.name for layer in layers]}
    was_training = model.training
    model.eval()
    try:
        for method in chosen:
            start = time.perf_counter()
            with autocast(precision, device):
                got = FUNCTIONS[method](t, opts[method])
            if method == "greedy":
                got, zeroed, broken = got
                out["greedy_zeroed"], out["greedy_broken"] = zeroed.numpy(), broken.numpy()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["seconds"][method] = time.perf_counter() - start
            out["scores"][method] = got.numpy()
    finally:
        model.train(was_training)
    return out
