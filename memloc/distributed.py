"""Work split across processes with torch.distributed: ``torchrun --nproc-per-node K -m memloc ...``.

torchrun starts K processes and tells each its ``RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR`` /
``MASTER_PORT``; several machines work the same way with ``--nnodes``). A command that can split
its work (``SHARDED = True`` in its module) joins the process group (:func:`init_from_env`: NCCL
on CUDA, each process on GPU ``LOCAL_RANK``; gloo on CPU); each rank does its share
(:func:`shard`: every K-th item) and saves it atomically in part files; rank 0 merges the parts and
writes the one result. Parts are kept until the result is saved, so a killed rank's work is
redone by the next run of the same command and finished parts are not.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist

from .errors import MemlocError

__all__ = ["world", "requested_world", "init_from_env", "barrier", "broadcast", "shard", "rank_suffix"]


def requested_world() -> int:
    """The number of processes the environment asks for (torchrun's ``WORLD_SIZE``; 1 without)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def world() -> tuple[int, int]:
    """(rank, number of processes) of the joined process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device | str, *, command: str = "this command", sharded: bool = True) -> tuple[int, int]:
    """Join the process group torchrun describes, once; returns :func:`world`.

    Commands that cannot split their work refuse to run in more than one process (each would
    repeat the whole job)."""
    size = requested_world()
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not sharded:
        raise MemlocError(f"{command} does not split its work across processes: run it without torchrun "
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


def shard(items: Sequence) -> list:
    """This rank's share of ``items``: every ``size``-th item from position ``rank`` (all outside a group)."""
    rank, size = world()
    return list(items)[rank::size]


def rank_suffix() -> str:
    """``""`` in one process, ``"_r<rank>"`` in a group (part file names that ranks never share)."""
    rank, size = world()
    return "" if size == 1 else f"_r{rank}"
