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

import os

from ..core.errors import MemlocError
from ..core.figures import figure, plt, save_figure, table
from ..core.lm import suffix_measures
from ..core.precision import check_precision
from ..core.options import add_eval_batch_size, add_precision, nonnegative_int, positive_int
from ..core.registry import Analysis, Command
from ..core.results import Result
from ..core.run import Run
from ..core.runtime import check_range, resolve_device
from ..core.schemas import Schema, Var
from ..core.selection import lm_source
from ..core.sequences import KINDS, SequenceSet, check_span
from ..core.store import stored
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
@stored("memorisation")
def memorisation(source, data: SequenceSet | None = None, *, split: str = "train", checkpoint: int | None = None,
                 eval_batch_size: int = 1024, device="auto", precision: str = "fp32") -> Result:
    """The ``"memorisation"`` result of language model ``source`` on ``data`` (a :class:`SequenceSet`):
    suffix loss, accuracy and exact memorisation of every sequence of ``split`` (``train``, or
    ``test``: held-out sequences, all clean, none a target), with its target flag and kind.

    ``source``: a causal LM (:class:`memloc.core.lm.TinyGPT`, a ``transformers`` model, any module
    that :func:`memloc.core.lm.lm_logits` runs); it is moved to ``device`` and evaluated in eval
    mode (its training mode is restored). Or a language-model run (a :class:`memloc.Run` or its path):
    its model at ``checkpoint`` (default the final epoch) on its sequences (``data`` None).
    ``precision``: fp32, or bf16 / fp16 autocast.

    In a process group (a script run by torchrun that joined it) the batches are split across the
    ranks and gathered (:func:`memloc.scale.ddp.measures_split`): every rank returns the result of
    one process, exactly.
    """
    epoch = None
    if checkpoint is not None:
        checkpoint = check_range("checkpoint", checkpoint, low=0, integer=True)
    if isinstance(source, (str, os.PathLike, Run)):
        source, data, epoch = lm_source(source, data, checkpoint=checkpoint, device=device, analysis="memorisation")
    elif not isinstance(source, torch.nn.Module):
        raise MemlocError(f"source must be a causal language model (a torch module) or a language-model run, got "
                          f"{type(source).__name__}", argument="source")
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
                                              "precision": precision, "checkpoint": epoch})


def plot_memorisation(res, out, run=None) -> str:
    """The ``memorisation`` result's section: per kind, the share reproduced and the suffix token accuracy."""
    kind, mem = res["kind"].values.astype(str), res["memorised"].values.astype(bool)
    acc = res["suffix_accuracy"].values
    kinds = [k for k in KINDS if (kind == k).any()]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = np.arange(len(kinds))
    ax.bar(x - 0.2, [100 * mem[kind == k].mean() for k in kinds], 0.4, color="tab:red", label="suffix reproduced")
    ax.bar(x + 0.2, [100 * acc[kind == k].mean() for k in kinds], 0.4, color="tab:gray", label="suffix tokens right")
    ax.set_xticks(x, [f"{k} ({int((kind == k).sum())})" for k in kinds])
    ax.set(ylabel="%", ylim=(0, 122), title=f"{res.config['split']} sequences at epoch {res.config.get('checkpoint')}")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    name = save_figure(fig, out, "memorisation.png")
    rows = [[k, int((kind == k).sum()), 100 * mem[kind == k].mean(), 100 * acc[kind == k].mean(),
             float(res["suffix_loss"].values[kind == k].mean())] for k in kinds]
    return ("## Memorised sequences at one checkpoint\n\n"
            + figure("memorisation", name, "per kind of sequence (count in brackets), the share whose suffix greedy "
                     "decoding reproduces exactly from the prefix (red) and the share of suffix tokens predicted right "
                     "(grey), at the checkpoint `memloc memorisation` measured.")
            + "\n\n" + table(["kind", "sequences", "memorised (%)", "suffix token accuracy (%)", "suffix loss"], rows,
                                digits=1))


def _cli_arguments(p):
    p.add_argument("--checkpoint", type=nonnegative_int, default=None, help="checkpoint epoch (default: final)")
    p.add_argument("--split", default="train", choices=list(SPLITS),
                   help="train (the training sequences) or test (the held-out ones)")
    add_eval_batch_size(p)
    add_precision(p, what="every forward pass")


def _cli_summary(res, args):
    mem, kind = res["memorised"].values.astype(bool), res["kind"].values.astype(str)
    epoch = res.config.get("checkpoint")
    lines = [f"{len(mem)} {res.config['split']} sequences at epoch {epoch}: {int(mem.sum())} reproduced from their "
             "prefix (greedy suffix exact)", f"{'kind':<10} {'sequences':>9} {'memorised':>10} {'suffix acc.':>12}"]
    for k in KINDS:
        rows = kind == k
        if rows.any():
            lines.append(f"{k:<10} {int(rows.sum()):9d} {mem[rows].mean():10.1%} "
                         f"{res['suffix_accuracy'].values[rows].mean():12.1%}")
    return "\n".join(lines)


ANALYSIS = Analysis(
    name="memorisation", order=155, compute=memorisation, plot=plot_memorisation,
    schema=Schema("memorisation", "which training sequences a language model reproduces from their prefix "
                  "(memloc.memorisation)",
  {"sequence": Var(("sequence",), "sequence id (row of the SequenceSet's tokens or test_tokens)")},
  {"suffix_loss": Var(("sequence",), "mean cross-entropy (nats) of the suffix tokens, teacher-forced"),
   "suffix_accuracy": Var(("sequence",), "fraction of suffix tokens that are the argmax prediction"),
   "memorised": Var(("sequence",), "greedy decoding from the prefix reproduces the whole suffix"),
   "is_target": Var(("sequence",), "a memorisation target (noisy, backdoor, canary or a copy)"),
   "kind": Var(("sequence",), "clean | noisy | backdoor | canary | duplicate")}),
    command=Command(
        name="memorisation", group="finding", example="memloc memorisation RUN --checkpoint 10",
        help="which sequences a language model reproduces from their prefix, at one checkpoint",
        description="Per training (or held-out) sequence of a language-model run at one checkpoint: suffix loss, "
                    "suffix token accuracy and exact memorisation (greedy decoding from the prefix reproduces the "
                    "suffix), with its kind. Writes RUN/results/memorisation.h5.",
        arguments=_cli_arguments, summary=_cli_summary,
        execute=lambda args: memorisation(args.run, split=args.split, checkpoint=args.checkpoint,
                                          eval_batch_size=args.eval_batch_size, device=args.device,
                                          precision=args.precision)),
)
