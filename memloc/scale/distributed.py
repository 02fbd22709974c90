"""Work split across processes with torch.distributed: ``torchrun --nproc-per-node K -m memloc ...``.

torchrun starts K processes and tells each its ``RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR`` /
``MASTER_PORT``; several machines work the same way with ``--nnodes``). A command that can split
its work (``SHARDED = True`` in its module) joins the process group (:func:`init_from_env`: NCCL
on CUDA, each process on GPU ``LOCAL_RANK``; gloo on CPU); each rank does its share
(:func:`shard`: every K-th item; :func:`claim`: the next item to whichever rank is free, for items of
very different cost) and saves it atomically in part files; rank 0 merges the parts and
writes the one result. Parts are kept until the result is saved, so a killed rank's work is
redone by the next run of the same command and finished parts are not.
"""
from __future__ import annotations

import itertools
import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..core.errors import MemlocError
from ..core.runtime import alone, world  # the process-group view every layer reads; re-exported here

__all__ = ["world", "alone", "requested_world", "init_from_env", "barrier", "broadcast", "shard", "claim", "rank_suffix",
           "split_bounds", "local_rows", "all_gather_rows", "broadcast_state", "on_rank0"]


def requested_world() -> int:
    """The number of processes the environment asks for (torchrun's ``WORLD_SIZE``; 1 without)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_from_env(device: torch.device | str, *, command: str = "this command", sharded: bool = True,
                  why: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes, once; returns :func:`world`.

    Commands that cannot split their work refuse to run in more than one process (each would
    repeat the whole job); ``why``: the reason their refusal gives."""
    size = requested_world()
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not sharded:
        reason = f" ({why})" if why else ""
        raise MemlocError(f"{command} does not split its work across processes{reason}: run it without torchrun "
                          f"(WORLD_SIZE is {size})")
    if not dist.is_available():
        raise MemlocError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world()


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if world()[1] > 1:
        dist.barrier()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself outside a group); also a synchronisation point."""
    if world()[1] == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence, key=None) -> list:
    """This rank's share of ``items``: every ``size``-th item from position ``rank`` (all outside a group).

    ``key(item)``: items with the same key go to the same rank, the distinct keys dealt out in order
    of first appearance (flip: an example's repeats together, so that ranks do not split by repeat,
    whose costs differ)."""
    rank, size = world()
    items = list(items)
    if key is None:
        return items[rank::size]
    order: dict = {}
    for item in items:
        order.setdefault(key(item), len(order))
    return [item for item in items if order[key(item)] % size == rank]


_CLAIMS = itertools.count()     # one key per collective call of claim (every rank makes the same calls)


def claim(items: Sequence) -> Iterator:
    """The items this rank computes, each claimed from a counter shared by the ranks (the process
    group's key-value store) the moment the rank is free: the work balances itself when items cost
    very differently (retrain: a layer near the input retrains the whole network above it, the last
    layer one linear map). Put the costliest items first. Every item goes to exactly one rank; which
    one depends on timing, so an item's value must not depend on its rank (as with :func:`shard`).
    All items, in order, outside a group. Collective: every rank calls it, the same number of times."""
    items = list(items)
    rank, size = world()
    if size == 1:
        yield from items
        return
    store = dist.distributed_c10d._get_default_store()
    key = f"memloc/claim/{next(_CLAIMS)}"
    while (i := store.add(key, 1) - 1) < len(items):
        yield items[i]


def rank_suffix() -> str:
    """``""`` in one process, ``"_r<rank>"`` in a group (part file names that ranks never share)."""
    rank, size = world()
    return "" if size == 1 else f"_r{rank}"


def split_bounds(n: int, parts: int) -> list[int]:
    """Offsets ``0 = b[0] <= ... <= b[parts] = n`` of ``parts`` contiguous slices of ``n`` rows whose
    sizes differ by at most one (the first ``n % parts`` slices one row longer; some empty when ``n < parts``)."""
    base, extra = divmod(int(n), int(parts))
    out = [0]
    for r in range(parts):
        out.append(out[-1] + base + (r < extra))
    return out


def local_rows(n: int) -> slice:
    """This rank's contiguous slice of a batch of ``n`` rows (:func:`split_bounds`; all rows outside a group)."""
    rank, size = world()
    bounds = split_bounds(n, size)
    return slice(bounds[rank], bounds[rank + 1])


def all_gather_rows(t: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Every rank's ``t`` (its own number of rows, same trailing shape) concatenated in rank order,
    on every rank; ``t`` itself outside a group. ``sizes``: the ranks' row counts when every rank
    knows them (otherwise gathered first). Rows are padded to the longest for the collective."""
    rank, size = world()
    if size == 1:
        return t
    if sizes is None:
        counts = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(size)]
        dist.all_gather(counts, torch.tensor([len(t)], dtype=torch.long, device=t.device))
        sizes = [int(c) for c in counts]
    longest = max(max(sizes), 1)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def broadcast_state(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers (batch-norm running statistics, ...) copied into ``module`` on
    every rank (nothing outside a group)."""
    if world()[1] > 1:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)


def on_rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on rank 0 alone (the one writer), its return value broadcast to every
    rank (so it must pickle); a plain call outside a group. A :class:`MemlocError` on rank 0 is raised
    on every rank, so that all stop with the same one-line error instead of waiting for rank 0; any
    other exception is re-raised on rank 0 and becomes a RuntimeError on the others."""
    rank, size = world()
    if size == 1:
        return fn(*args, **kwargs)
    out = (None, None, None)
    if rank == 0:
        try:
            out = ("ok", fn(*args, **kwargs), None)
        except MemlocError as e:
            broadcast(("memloc", e, None))
            raise
        except BaseException as e:
            broadcast(("failed", type(e).__name__, None))
            raise
    kind, value, _ = broadcast(out)
    if kind == "memloc":
        raise value
    if kind == "failed":
        raise RuntimeError(f"rank 0 failed ({value}); see its error")
    return value
