"""memloc.scale.handoff: every piece finished exactly once, by its maker or by a free rank, and each
item's values returned in order to the one rank that records its last piece; pieces are copied to the
store only once a rank is idle."""
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from memloc.scale.handoff import Handoff

COUNTS = {0: 6, 1: 2}       # rank 0 makes item 0 (slowly), rank 1 item 1, then helps with item 0


def test_one_process_finishes_every_piece_itself():
    h = Handoff(COUNTS)
    got = []
    for i in (0, 1):
        for j in range(COUNTS[i]):
            h.put(i, j, f"piece {i}.{j}")
        for j in h.take(i):
            got.append(h.done(i, j, 10 * i + j))
    assert list(h.ready()) == []                  # nothing is left for another rank
    assert [g for g in got if g is not None] == [[0, 1, 2, 3, 4, 5], [10, 11]]


def _worker(rank, port, out):
    import time
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        h = Handoff(COUNTS)
        finished, saved = [], {}
        mine = rank                               # rank r makes item r
        h.put(mine, 0, {"i": mine, "j": 0})       # no rank is idle yet: kept, not copied to the store
        copied_while_busy = h.published
        dist.barrier()
        for j in range(1, COUNTS[mine]):
            if rank == 0:
                time.sleep(0.3)                   # rank 1 is free long before item 0 is made
            h.put(mine, j, {"i": mine, "j": j})
        for j in h.take(mine):
            finished.append((mine, j))
            saved[mine] = h.done(mine, j, 100 * mine + j) or saved.get(mine)
        for i, j, piece in h.ready():
            assert piece == {"i": i, "j": j}
            finished.append((i, j))
            saved[i] = h.done(i, j, 100 * i + j) or saved.get(i)
        out.put((rank, finished, {i: v for i, v in saved.items() if v}, copied_while_busy, h.published))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_share_the_pieces_of_one_item():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = mp.start_processes(_worker, args=(port, out), nprocs=2, join=False, start_method="spawn")
    got = dict((r, rest) for r, *rest in (out.get(timeout=120) for _ in range(2)))
    procs.join()
    finished = got[0][0] + got[1][0]
    assert sorted(finished) == [(i, j) for i in COUNTS for j in range(COUNTS[i])]   # each exactly once
    helped = sum(i == 0 for i, _ in got[1][0])
    assert helped > 0                             # the free rank took pieces of rank 0's item
    assert got[0][2] == got[1][2] == 0            # nothing copied while every rank had work of its own
    assert helped <= got[0][3] <= COUNTS[0]       # then each piece rank 1 took, copied once at most
    saved = {**got[0][1], **got[1][1]}
    assert len(got[0][1]) + len(got[1][1]) == 2 and saved == {0: [0, 1, 2, 3, 4, 5], 1: [100, 101]}
