"""Work finer than an item: pieces one rank makes and any rank finishes (torchrun; see :mod:`memloc.scale.distributed`).

:func:`memloc.scale.distributed.claim` hands whole items to whichever rank is free; when one item
costs more than the rest together (retrain: the first layer retrains the whole network above it),
that one item bounds the speed-up. Part of such an item can often be done elsewhere: retraining a
layer is a chain of epochs (one rank), but evaluating the weights of each epoch needs only those
weights. A :class:`Handoff` carries such *pieces* (item ``i``'s piece ``j``: e.g. the layer's
tensors after epoch ``j``) to free ranks through the process group's key-value store. Every piece is
finished by exactly one rank, claimed in order the moment that rank is free: the maker itself once
its item is made (:meth:`~Handoff.take`, its own copy, no transfer) or a rank with nothing else to do
(:meth:`~Handoff.ready`, a published piece). The maker :meth:`~Handoff.put` s each piece as soon as
it exists, but a piece is copied into the store only while some rank is idle (it has entered
:meth:`~Handoff.ready`): while every rank has work of its own, handing off would only add copies.
Once a rank is idle, the maker publishes the pieces made and not yet claimed, each new one as it is
made, and while it finishes its own pieces it keeps ``size - 1`` pieces ahead published, the next
ones a free rank can claim. :meth:`~Handoff.done` records a finished piece's value; the rank that
records an item's last one gets all of them, in order, to save. Which rank finishes a piece depends
on timing, so a piece's value must not depend on its rank. Outside a process group nothing is
published and every piece is the caller's (one process does it all, in order).
"""
from __future__ import annotations

import itertools
import pickle
import time
from typing import Callable, Iterator

import torch.distributed as dist

from ..core.runtime import world

__all__ = ["Handoff"]

_CALLS = itertools.count()      # one key space per collective construction (every rank makes the same ones)
POLL_S = 0.01                   # how often a free rank looks for newly published pieces


class Handoff:
    """Pieces ``counts[i]`` of each item ``i`` (an int), made by one rank and finished by any.
    Collective: every rank constructs it with the same ``counts``."""

    def __init__(self, counts: dict[int, int]):
        self.counts = {int(i): int(n) for i, n in counts.items()}
        self.size = world()[1]
        self.store = dist.distributed_c10d._get_default_store() if self.size > 1 else None
        self.prefix = f"memloc/handoff/{next(_CALLS)}"
        self.values: dict[tuple[int, int], object] = {}       # finished values (one process only)
        self.claimed: dict[int, int] = {}                     # claimed pieces per item (one process only)
        self.made: dict[int, list] = {}                       # this rank's pieces per item, until claimed
        self.mine: dict[int, set] = {}                        # per item: the pieces this rank claimed in take
        self.shown: dict[int, set] = {}                       # per item: the pieces this rank published
        self.idle = False                                     # whether some rank is known to be idle
        self.published = 0                                    # pieces this rank copied into the store

    def _key(self, kind: str, i: int | None = None, j: int | None = None) -> str:
        return f"{self.prefix}/{kind}" + ("" if i is None else f"/{i}") + ("" if j is None else f"/{j}")

    def put(self, i: int, j: int, piece) -> None:
        """Item ``i``'s piece ``j`` (made in order, it must pickle), for any rank to finish: kept here, and
        published (with the earlier unclaimed ones) when some rank is idle."""
        made = self.made.setdefault(i, [])
        if j != len(made):
            raise ValueError(f"item {i}: piece {j} put after {len(made)} pieces")
        made.append(piece)
        if self.store is not None:
            self._publish(i, len(made))

    def _wanted(self) -> bool:
        """Whether some rank has entered :meth:`ready` (once seen, not asked again)."""
        if not self.idle and self.store is not None:
            self.idle = self.store.add(self._key("idle"), 0) > 0
        return self.idle

    def _publish(self, i: int, upto: int) -> None:
        """If some rank is idle, publish item ``i``'s made pieces not claimed by this rank nor published yet:
        those below ``upto`` and every one another rank has claimed (it waits for it)."""
        if not self._wanted():
            return
        made, mine, shown = self.made.get(i, ()), self.mine.setdefault(i, set()), self.shown.setdefault(i, set())
        for j in range(min(len(made), max(upto, self._next(i, 0)))):
            if j not in mine and j not in shown:
                self.store.set(self._key("piece", i, j), pickle.dumps(made[j], protocol=pickle.HIGHEST_PROTOCOL))
                self.published += 1
                shown.add(j)

    def _next(self, i: int, take: int = 1) -> int:
        """The number of item ``i``'s pieces claimed so far, ``take`` more claimed (0: only read it)."""
        if self.store is None:
            self.claimed[i] = self.claimed.get(i, 0) + take
            return self.claimed[i]
        return self.store.add(self._key("claim", i), take)

    def _drop(self, i: int, j: int) -> None:
        """Free a claimed piece's published copy (kept where the store cannot delete, e.g. a FileStore)."""
        if self.store is not None and j in self.shown.get(i, ()):
            try:
                self.store.delete_key(self._key("piece", i, j))
            except (RuntimeError, NotImplementedError):
                pass

    def take(self, i: int) -> Iterator[int]:
        """The pieces of item ``i`` (made and :meth:`put` by this rank, which holds its own copies) that
        this rank is to finish, each claimed when the previous one is finished; the others go to idle
        ranks (for them, the ``size - 1`` pieces after the one claimed are published first)."""
        while True:
            j = self._next(i) - 1
            self.mine.setdefault(i, set()).add(j)
            if self.store is not None:
                self._publish(i, j + self.size)     # also any piece an idle rank claimed meanwhile
            if j >= self.counts[i]:
                break
            self._drop(i, j)
            yield j
        for d in (self.made, self.mine, self.shown):
            d.pop(i, None)

    def ready(self, prefer: Callable[[int], bool] = lambda i: False) -> Iterator[tuple[int, int, object]]:
        """``(i, j, piece)`` for the published pieces this rank claims, until every piece of every item
        is claimed; the next piece of an item for which ``prefer(i)`` holds first (e.g. one this rank
        can finish without setting anything up), then of the lowest item. Pieces of an item are claimed
        in order (each the next one not claimed)."""
        if self.store is None:
            return
        self.store.add(self._key("idle"), 1)      # from now on, makers publish their pieces
        open_items = sorted(self.counts)
        while open_items:
            found = None
            for i in sorted(open_items, key=lambda i: (not prefer(i), i)):
                j = self._next(i, 0)
                if j >= self.counts[i]:
                    open_items.remove(i)
                elif self.store.check([self._key("piece", i, j)]):
                    found = i
                    break
            if found is None:
                if open_items:
                    time.sleep(POLL_S)
                continue
            j = self._next(found) - 1
            if j < self.counts[found]:      # another rank may have claimed it first: then the next one
                piece = pickle.loads(self.store.get(self._key("piece", found, j)))  # waits until it is published
                self._drop(found, j)
                yield found, j, piece

    def done(self, i: int, j: int, value) -> list | None:
        """Record the value of item ``i``'s piece ``j`` (it must pickle); returns every value of item
        ``i`` in piece order on the rank that records the last of them, else None."""
        n = self.counts[i]
        if self.store is None:
            self.values[(i, j)] = value
            last = all((i, k) in self.values for k in range(n))
            return [self.values.pop((i, k)) for k in range(n)] if last else None
        self.store.set(self._key("value", i, j), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        if self.store.add(self._key("finished", i), 1) < n:
            return None
        return [pickle.loads(self.store.get(self._key("value", i, k))) for k in range(n)]
