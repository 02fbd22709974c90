"""The expensive passes of the scores, in resumable cells split across processes.

el2n needs the logits of the checkpoint of epoch k (a language model's run: its EL2N per sequence), grand the per-example gradient norms of that
checkpoint and tracin those of every trained checkpoint: each is a *pass* ``(kind, epoch)`` of one
model over the training set (:data:`LOGITS` or :data:`GRAD_NORMS`). A pass is cut into blocks of
whole batches (at most :data:`BLOCKS` per pass), and each ``(kind, epoch, block)`` cell is one
resumable item of :class:`memloc.scale.parts.Parts`: saved as it finishes, taken from the parts folder by a
rerun with the same settings, and under torchrun (:mod:`memloc.scale.distributed`) dealt out to the
processes, rank 0 merging. Every batch is the one the whole-set pass would run (blocks start at
multiples of the batch size) and every example's values are computed alone, so the merged arrays
equal a pass over the whole set exactly, in any number of processes.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ...scale.distributed import shard, world
from ...scale.parts import Parts
from ...core.runtime import progress

__all__ = ["LOGITS", "GRAD_NORMS", "EL2N", "BLOCKS", "block_rows", "run_passes"]

#: the kinds of pass: (N, C) logits, (N,) gradient norms, (N,) EL2N (a language model's, computed per
#: batch: its (S, V) suffix logits per sequence are not kept)
LOGITS, GRAD_NORMS, EL2N = 0, 1, 2
BLOCKS = 16                        # at most this many cells per pass (so up to 16 processes share one)


def block_rows(num_examples: int, batch_size: int) -> int:
    """Examples per cell: whole batches, at most :data:`BLOCKS` cells over ``num_examples``."""
    batches = max(1, math.ceil(num_examples / batch_size))
    return batch_size * math.ceil(batches / BLOCKS)


def run_passes(passes: Sequence[tuple[int, int]], train, model_at: Callable, cell: Callable, *, batch_size: int,
               folder, settings: dict, overwrite: bool = False) -> dict | None:
    """Every pass ``(kind, epoch)`` over ``train`` (an :class:`memloc.core.data.ExampleSet` in id order).

    ``model_at(epoch)`` gives the model of a checkpoint; ``cell(kind, model, examples)`` computes one
    cell (an array with one row per example). ``folder`` / ``settings`` / ``overwrite``: the parts
    folder (None: nothing saved, one process only) and what its parts must have been made with.

    Returns ``{(kind, epoch): array over the whole set}`` on rank 0 (outside a process group: the
    only rank), None on the others.
    """
    n = len(train)
    rows = block_rows(n, batch_size)
    blocks = math.ceil(n / rows)
    passes = sorted(set(passes), key=lambda p: (p[1], p[0]))     # one model load per checkpoint and rank
    parts = Parts(folder, {**settings, "block_rows": rows, "num_examples": n}, what="scores", overwrite=overwrite)
    try:
        todo = [(kind, epoch, b) for kind, epoch in passes for b in range(blocks)
                if (kind, epoch, b) not in parts.done]
        loaded, model = None, None
        for kind, epoch, b in progress(shard(todo), desc="scores", unit="block"):
            if loaded != epoch:
                model, loaded = model_at(epoch), epoch
            examples = train.subset(np.arange(b * rows, min(n, (b + 1) * rows)))
            parts.add({(kind, epoch, b): cell(kind, model, examples)})
        parts.gather()
    finally:
        parts.release()
    if world()[0] > 0:
        return None                    # rank 0 merges
    merged = {(kind, epoch): np.concatenate([parts.done[(kind, epoch, b)] for b in range(blocks)])
              if blocks else np.zeros(0) for kind, epoch in passes}
    return merged
