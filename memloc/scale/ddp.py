"""Training one run across a process group (torchrun): DistributedDataParallel, the loss of a
rank's slice of each batch, and the end-of-epoch evaluation split across the ranks (of a classifier:
:func:`evaluate_split`; of a language model's sequences: :func:`measures_split`)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_rows, broadcast_state, world
from ..core.evaluate import evaluate
from ..core.lm import MEASURES, sequence_measures, suffix_measures
from ..core.precision import autocast

__all__ = ["batch_loss", "evaluate_split", "measures_split", "gather_measures", "gather_rows_measures",
           "gather_suffix_measures", "sync_batchnorm", "data_parallel"]


def batch_loss(logits, y, w, batch: int, parts: int) -> torch.Tensor:
    """The training loss of this process's rows of a batch of ``batch`` examples (``w``: their loss
    weights or None). One process: the batch mean. ``parts`` processes (DDP averages their gradients):
    the rows' sum x ``parts / batch``, so that the average is the gradient of the whole batch's mean,
    also when the slices differ in size (the last batch)."""
    if parts == 1:
        return F.cross_entropy(logits, y) if w is None else (F.cross_entropy(logits, y, reduction="none") * w).mean()
    loss = F.cross_entropy(logits, y, reduction="none")
    return (loss if w is None else loss * w).sum() * (parts / batch)


#: dtypes of the per-example columns of :func:`memloc.core.evaluate.evaluate` (as gathered across ranks)
_EVAL_DTYPES = {"idx": np.int64, "loss": np.float32, "correct": np.bool_, "margin": np.float32, "pred": np.int64}


def evaluate_split(model: nn.Module, data, batch_size: int, device: torch.device, precision: str) -> dict:
    """The end-of-epoch passes of :meth:`Recorder.end_epoch` split across the ranks: each evaluates
    every K-th of one process's evaluation batches (so every example's numbers are the same as in
    one process), gathered on every rank in id order; ``{"train": ..., "test": ...}``."""
    rank, parts = world()
    broadcast_state(model)      # rank 0's weights and batch-norm statistics (its checkpoint's) everywhere
    out = {}
    with autocast(precision, device):
        for name, examples in (("train", data.train), ("test", data.test)):
            mine = evaluate(model, (b for i, b in enumerate(examples.batches(batch_size)) if i % parts == rank))
            cols = {k: all_gather_rows(torch.from_numpy(np.asarray(mine[k], dtype=np.uint8 if t is np.bool_ else t))
                                       .to(device)).cpu().numpy() for k, t in _EVAL_DTYPES.items()}
            order = np.argsort(cols["idx"], kind="stable")
            out[name] = {k: (v[order].astype(bool) if _EVAL_DTYPES[k] is np.bool_ else v[order])
                         for k, v in cols.items()}
    return out


def gather_measures(values: dict, rows: slice | np.ndarray, device=None) -> dict[str, np.ndarray]:
    """Every rank's sequence measures ``values`` (:data:`memloc.core.lm.MEASURES`: arrays of this
    rank's ``rows``: a ``slice`` of a batch, or row ids) on every rank, each sequence in its place
    (the rows in ascending order; losses and accuracies as float64); ``values`` itself outside a group."""
    return gather_rows_measures(values, rows, device)[1]


def gather_rows_measures(values: dict, rows: slice | np.ndarray, device=None) -> tuple[np.ndarray, dict]:
    """:func:`gather_measures` and the rows it put them in: every rank's, in ascending order (outside a
    group ``rows`` as given). One gather of the rows serves both."""
    index = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows)
    if world()[1] == 1:
        return index, {k: np.asarray(values[k]) for k in MEASURES}
    every = all_gather_rows(torch.as_tensor(index, dtype=torch.long, device=device)).cpu().numpy()
    order = np.argsort(every, kind="stable")
    out = {}
    for k in MEASURES:      # floats as float64 (exact for float32 values), the flag as bytes (gloo)
        v = torch.as_tensor(np.asarray(values[k], dtype=np.uint8 if k == "memorised" else np.float64))
        v = all_gather_rows(v.to(device)).cpu().numpy()[order]
        out[k] = v.astype(bool) if k == "memorised" else v
    return every[order], out


def gather_suffix_measures(logits: torch.Tensor, tokens: torch.Tensor, prefix_len: int, suffix_len: int,
                           rows: slice | np.ndarray, device=None) -> tuple[np.ndarray, dict]:
    """The suffix measures (:func:`memloc.core.lm.suffix_measures`) of this rank's training ``logits`` of
    ``tokens`` (its ``rows``), gathered from every rank: :func:`gather_rows_measures`."""
    with torch.no_grad():
        mine = suffix_measures(logits.detach(), tokens, prefix_len, suffix_len)
    return gather_rows_measures(dict(zip(MEASURES, (m.cpu().numpy() for m in mine))), rows, device)


def measures_split(model: nn.Module, tokens: torch.Tensor, prefix_len: int, suffix_len: int, *,
                   eval_batch_size: int = 1024, precision: str = "fp32") -> dict[str, np.ndarray]:
    """:func:`memloc.core.lm.sequence_measures` split across the ranks: each measures every K-th of
    one process's batches (so every sequence's numbers are exactly one process's), gathered on every
    rank in row order; one process: ``sequence_measures`` itself."""
    rank, parts = world()
    kw = {"eval_batch_size": eval_batch_size, "precision": precision}
    if parts == 1:
        return sequence_measures(model, tokens, prefix_len, suffix_len, **kw)
    starts = list(range(0, len(tokens), eval_batch_size))[rank::parts]
    mine = [sequence_measures(model, tokens[i:i + eval_batch_size], prefix_len, suffix_len, **kw) for i in starts]
    rows = np.concatenate([np.arange(i, min(i + eval_batch_size, len(tokens))) for i in starts] or
                          [np.zeros(0, np.int64)]).astype(np.int64)
    values = {k: np.concatenate([m[k] for m in mine]) if mine else np.zeros(0) for k in MEASURES}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return gather_measures(values, rows, device)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """In a process group on CUDA, ``model`` with its batch norms turned into SyncBatchNorm
    (statistics of the whole global batch, as in one process; parameters and buffers kept). Called on
    the freshly built model, before layers or hooks are added to it (example-tied dropout may hook a
    batch norm: a module replaced later would lose its hook). ``model`` itself otherwise."""
    if world()[1] == 1 or device.type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when training across a process group (``model``
    itself in one process; checkpoints always save ``model``, so their keys never change).

    Batch norms: on CUDA they are SyncBatchNorm already (:func:`sync_batchnorm`). torch's
    SyncBatchNorm does not run on the CPU, where each rank normalises its slice with its own
    statistics and the running statistics are rank 0's (DDP broadcasts its buffers): such a run
    differs from one-process training (a warning says so)."""
    rank, parts = world()
    if parts == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    # harmless (size-1 dimensions, e.g. the first conv of grayscale images): not worth a line per process
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    if rank == 0 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn(f"batch norm across {parts} CPU processes normalises each process's slice of a batch "
                      "with its own statistics (SyncBatchNorm needs CUDA): the run differs from one-process "
                      "training")
    return DistributedDataParallel(model)
