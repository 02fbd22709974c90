"""Which training sequences a language model has memorised: suffix loss, accuracy and exact memorisation.

From ONE teacher-forced forward pass of each sequence ``tokens[:, :prefix_len + suffix_len - 1]``
(the logits at position t predict token t + 1), over the suffix positions
``prefix_len .. prefix_len + suffix_len - 1``:

- ``suffix_loss``: mean cross-entropy (nats per token);
- ``suffix_accuracy``: fraction of suffix tokens that are the argmax of their logits;
- ``memorised``: every suffix token is the argmax. This is exactly "greedy decoding of
  ``suffix_len`` tokens from the prefix reproduces the suffix" (the extraction test of Carlini et
  al. 2021 / TinyMem): while the argmax is right, greedy decoding sees the same context as teacher
  forcing, and at the first wrong argmax it leaves the suffix. (Ties go to the lowest token id in
  both; numerically the two differ only where two logits tie to rounding.)

:func:`memorisation_from_logits` is the array-level core; :func:`memorisation` runs a model over a
:class:`memloc.core.sequences.SequenceSet` and returns the ``"memorisation"`` result.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..core.errors import MemlocError
from ..core.lm import suffix_measures
from ..core.precision import check_precision
from ..core.registry import Analysis
from ..core.results import Result
from ..core.runtime import check_range, resolve_device
from ..core.schemas import Schema, Var
from ..core.sequences import SequenceSet, check_span
from ..scale.ddp import measures_split

__all__ = ["memorisation_from_logits", "memorisation", "SPLITS"]

SPLITS = ("train", "test")


def _tensor(x, argument: str) -> torch.Tensor:
    try:
        return torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x))
    except (TypeError, ValueError, RuntimeError):
        raise MemlocError(f"{argument} must be an array or tensor, got {type(x).__name__}", argument=argument) from None


def _check(logits, tokens, prefix_len, suffix_len):
    logits, tokens = _tensor(logits, "logits"), _tensor(tokens, "tokens")
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise MemlocError(f"tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; give (B, T) integer "
                          "token ids", argument="tokens")
    check_span(prefix_len, suffix_len, tokens.shape[1])
    need = prefix_len + suffix_len - 1
    if (logits.ndim != 3 or logits.shape[0] != tokens.shape[0] or logits.shape[1] < need
            or not logits.dtype.is_floating_point):
        raise MemlocError(f"logits has shape {tuple(logits.shape)}; give (B, T', V) float logits with B = "
                          f"{tokens.shape[0]} and T' >= prefix_len + suffix_len - 1 = {need}", argument="logits")
    if not bool(torch.isfinite(logits).all()):
        raise MemlocError("logits holds values that are not finite", argument="logits")
    suffix = tokens[:, prefix_len:prefix_len + suffix_len]
    if suffix.numel() and (int(suffix.min()) < 0 or int(suffix.max()) >= logits.shape[2]):
        raise MemlocError(f"tokens holds ids outside the {logits.shape[2]} logits of the vocabulary", argument="tokens")
    return logits, tokens.long()


def memorisation_from_logits(logits, tokens, prefix_len: int, suffix_len: int) -> dict[str, np.ndarray]:
    """Per sequence, from teacher-forced ``logits`` (B, T', V) of ``tokens`` (B, T): ``suffix_loss``
    (mean cross-entropy over the suffix), ``suffix_accuracy`` and ``memorised`` (the argmax right at
    every suffix position) as numpy arrays (B,). The suffix is ``tokens[:, prefix_len:prefix_len +
    suffix_len]``; ``logits[:, t]`` predicts ``tokens[:, t + 1]``, so T' >= prefix_len + suffix_len - 1."""
    logits, tokens = _check(logits, tokens, prefix_len, suffix_len)
    with torch.no_grad():
        loss, acc, mem = suffix_measures(logits.detach(), tokens, prefix_len, suffix_len)
    return {"suffix_loss": loss.double().cpu().numpy(), "suffix_accuracy": acc.double().cpu().numpy(),
            "memorised": mem.cpu().numpy()}


@torch.no_grad()
def memorisation(source, data: SequenceSet, *, split: str = "train", eval_batch_size: int = 256,
                 device="auto", precision: str = "fp32") -> Result:
    """The ``"memorisation"`` result of language model ``source`` on ``data`` (a :class:`SequenceSet`):
    suffix loss, accuracy and exact memorisation of every sequence of ``split`` (``train``, or
    ``test``: held-out sequences, all clean, none a target), with its target flag and kind.

    ``source``: a causal LM (:class:`memloc.core.lm.TinyGPT`, a ``transformers`` model, any module
    that :func:`memloc.core.lm.lm_logits` runs); it is moved to ``device`` and evaluated in eval
    mode (its training mode is restored). ``precision``: fp32, or bf16 / fp16 autocast.

    In a process group (a script run by torchrun that joined it) the batches are split across the
    ranks and gathered (:func:`memloc.scale.ddp.measures_split`): every rank returns the result of
    one process, exactly.
    """
    if not isinstance(source, torch.nn.Module):
        raise MemlocError(f"source must be a causal language model (a torch module), got {type(source).__name__}",
                          argument="source")
    if not isinstance(data, SequenceSet):
        raise MemlocError(f"data must be a SequenceSet (memloc.tinymem, memloc.canaries), got {type(data).__name__}",
                          argument="data")
    if split not in SPLITS:
        raise MemlocError(f"split {split!r} is unknown; valid: {', '.join(SPLITS)}", argument="split")
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    device = resolve_device(device)
    check_precision(precision, device)
    tokens = data.tokens if split == "train" else data.test_tokens
    p, s = data.prefix_len, data.suffix_len
    was_training = source.training
    source.to(device).eval()
    try:
        cat = measures_split(source, tokens, p, s, eval_batch_size=eval_batch_size, precision=precision)
    finally:
        source.train(was_training)
    n = len(tokens)
    if split == "train":
        ids, target, kind = data.ids, data.is_memorised_target, data.kind
    else:
        ids, target, kind = np.arange(n), np.zeros(n, dtype=bool), np.full(n, "clean")
    ds = xr.Dataset({"suffix_loss": ("sequence", cat["suffix_loss"].astype(np.float64)),
                     "suffix_accuracy": ("sequence", cat["suffix_accuracy"].astype(np.float64)),
                     "memorised": ("sequence", cat["memorised"].astype(bool)),
                     "is_target": ("sequence", np.asarray(target, dtype=bool)),
                     "kind": ("sequence", np.asarray(kind, dtype=str))},
                    coords={"sequence": np.asarray(ids, dtype=np.int64)})
    return Result("memorisation", ds, config={"data": data.name, "split": split, "prefix_len": p, "suffix_len": s,
                                              "precision": precision})


ANALYSIS = Analysis(
    name="memorisation", order=155, compute=memorisation,
    schema=Schema("memorisation", "which training sequences a language model reproduces from their prefix "
                  "(memloc.memorisation)",
  {"sequence": Var(("sequence",), "sequence id (row of the SequenceSet's tokens or test_tokens)")},
  {"suffix_loss": Var(("sequence",), "mean cross-entropy (nats) of the suffix tokens, teacher-forced"),
   "suffix_accuracy": Var(("sequence",), "fraction of suffix tokens that are the argmax prediction"),
   "memorised": Var(("sequence",), "greedy decoding from the prefix reproduces the whole suffix"),
   "is_target": Var(("sequence",), "a memorisation target (noisy, backdoor, canary or a copy)"),
   "kind": Var(("sequence",), "clean | noisy | backdoor | canary | duplicate")}),
)
