"""Work finer than an item: pieces one rank makes and any rank finishes (torchrun; see :mod:`memloc.scale.distributed`).

:func:`memloc.scale.distributed.claim` hands whole items to whichever rank is free; when one item
costs more than the rest together (retrain: the first layer retrains the whole network above it),
that one item bounds the speed-up. Part of such an item can often be done elsewhere: retraining a
layer is a chain of epochs (one rank), but evaluating the weights of each epoch needs only those
weights. A :class:`Handoff` carries such *pieces* (item ``i``'s piece ``j``: e.g. the layer's
tensors after epoch ``j``) through the process group's key-value store: the rank making an item
:meth:`~Handoff.put` s each piece as soon as it exists, and every piece is finished by exactly one
rank, claimed the moment it is free: the maker itself once its item is made (:meth:`~Handoff.take`,
its own copy, no transfer) or a rank with nothing else to do (:meth:`~Handoff.ready`, any published
piece). :meth:`~Handoff.done` records a finished piece's value; the rank that records an item's last
one gets all of them, in order, to save. Which rank finishes a piece depends on timing, so a piece's
value must not depend on its rank. Outside a process group nothing is published and every piece is
the caller's (one process does it all, in order).
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

    def _key(self, kind: str, i: int, j: int | None = None) -> str:
        return f"{self.prefix}/{kind}/{i}" + ("" if j is None else f"/{j}")

    def put(self, i: int, j: int, piece) -> None:
        """Publish item ``i``'s piece ``j`` (it must pickle) for any rank to finish."""
        if self.store is not None:
            self.store.set(self._key("piece", i, j), pickle.dumps(piece, protocol=pickle.HIGHEST_PROTOCOL))

    def _next(self, i: int, take: int = 1) -> int:
        """The number of item ``i``'s pieces claimed so far, ``take`` more claimed (0: only read it)."""
        if self.store is None:
            self.claimed[i] = self.claimed.get(i, 0) + take
            return self.claimed[i]
        return self.store.add(self._key("claim", i), take)

    def _drop(self, i: int, j: int) -> None:
        """Free a claimed piece's published copy (kept where the store cannot delete, e.g. a FileStore)."""
        if self.store is not None:
            try:
                self.store.delete_key(self._key("piece", i, j))
            except (RuntimeError, NotImplementedError):
                pass

    def take(self, i: int) -> Iterator[int]:
        """The pieces of item ``i`` (made by this rank, which holds its own copies) that this rank is
        to finish, each claimed when the previous one is finished; the others go to free ranks."""
        while (j := self._next(i) - 1) < self.counts[i]:
            self._drop(i, j)
            yield j

    def ready(self, prefer: Callable[[int], bool] = lambda i: False) -> Iterator[tuple[int, int, object]]:
        """``(i, j, piece)`` for the published pieces this rank claims, until every piece of every item
        is claimed; the next piece of an item for which ``prefer(i)`` holds first (e.g. one this rank
        can finish without setting anything up), then of the lowest item. Pieces of an item are claimed
        in order (each the next one not claimed)."""
        if self.store is None:
            return
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
