"""Which examples a flip search looks at: the ``examples`` grammar and the reference batches."""
from __future__ import annotations

import numpy as np

from ...core.errors import MemlocError

__all__ = ["EXAMPLE_POOLS", "select_examples", "reference_batches"]

EXAMPLE_POOLS = ("noisy", "clean", "any")


def examples_spec(value, num_examples: int) -> str:
    """An example selection given as a value, in its text form (what the result's config records).

    ``value``: the text form itself (``"noisy:100,clean:100"``, ``"ids:1,5,9"``, ``"10-19"``), a
    mapping ``{pool: count}`` (``{"noisy": 100, "clean": "all"}``), a boolean mask over the
    ``num_examples`` training examples, or a sequence / array of example ids (kept in order).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ",".join(f"{pool}:{count}" for pool, count in value.items())
    ids = np.asarray(value)
    if ids.dtype == bool:
        if ids.shape != (num_examples,):
            raise MemlocError(f"examples: a mask must have one entry per training example ({num_examples}), "
                              f"got shape {ids.shape}", argument="examples")
        ids = np.flatnonzero(ids)
    elif ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise MemlocError("examples must be a selection text, a {pool: count} mapping, a boolean mask or "
                          f"example ids; got an array of dtype {ids.dtype} and shape {ids.shape}", argument="examples")
    if not ids.size:
        raise MemlocError("examples selects no example", argument="examples")
    return "ids:" + ",".join(str(int(i)) for i in ids)


def select_examples(spec, is_noisy: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Training example ids named by ``spec`` (text, or a value: :func:`examples_spec`).

    ``spec`` is a comma-separated list of terms: ``noisy:K``, ``clean:K``, ``any:K`` (K examples
    drawn without replacement from that pool with ``seed``; K may be ``all``), an id ``17``, an
    inclusive id range ``10-19``; ``ids:`` may prefix an id term (``ids:1,5,9``). Ids keep the
    order of the terms; an id named twice is kept once, and sampled terms never repeat an id
    chosen by an earlier term. Returns (K,) int64.
    """
    is_noisy = np.asarray(is_noisy, dtype=bool)
    n = len(is_noisy)
    spec = examples_spec(spec, n)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    seen: set[int] = set()

    def add(ids):
        for i in ids:
            if int(i) not in seen:
                seen.add(int(i))
                chosen.append(int(i))

    terms = [t.strip() for t in str(spec).split(",")]
    if not spec or not all(terms):
        raise MemlocError(f"examples {spec!r}: empty term (expected e.g. noisy:100,clean:100 or ids:1,5,9)", argument="examples")
    for term in terms:
        head, sep, tail = term.partition(":")
        if sep and head in EXAMPLE_POOLS:
            pool = {"noisy": np.flatnonzero(is_noisy), "clean": np.flatnonzero(~is_noisy),
                    "any": np.arange(n)}[head]
            pool = np.array([i for i in pool if i not in seen], dtype=np.int64)
            if tail == "all":
                k = len(pool)
            else:
                try:
                    k = int(tail)
                except ValueError:
                    raise MemlocError(f"examples term {term!r}: expected {head}:COUNT or {head}:all", argument="examples") from None
                if k < 1:
                    raise MemlocError(f"examples term {term!r}: the count must be at least 1", argument="examples")
            if head == "noisy" and not is_noisy.any():
                raise MemlocError(f"examples term {term!r}: this run has no noisy (mislabeled) examples", argument="examples")
            if k > len(pool):
                raise MemlocError(f"examples term {term!r}: only {len(pool)} {head} examples are available"
                                  f" (use {head}:all for all of them)", argument="examples")
            add(np.sort(rng.choice(pool, size=k, replace=False)) if k < len(pool) else pool)
            continue
        if sep and head != "ids":
            raise MemlocError(f"examples term {term!r}: unknown pool {head!r}; valid: "
                              f"{', '.join(EXAMPLE_POOLS)}, ids (e.g. noisy:100, clean:all, ids:1,5,9, 10-19)",
                              argument="examples")
        body = tail if sep else term
        lo, dash, hi = body.partition("-")
        try:
            ids = range(int(lo), int(hi) + 1) if dash else [int(body)]
        except ValueError:
            raise MemlocError(f"examples term {term!r} is neither POOL:COUNT nor an example id or id range", argument="examples") from None
        if not len(ids):
            raise MemlocError(f"examples term {term!r}: empty id range", argument="examples")
        if any(not 0 <= i < n for i in ids):
            raise MemlocError(f"examples term {term!r}: example ids must be in 0..{n - 1} (the run has {n} training examples)", argument="examples")
        add(ids)
    return np.array(chosen, dtype=np.int64)


def reference_batches(pool: np.ndarray, size: int, repeats: int, *, seed: int = 0) -> np.ndarray:
    """(repeats, size) example ids: one reference batch per repeat, drawn without replacement."""
    pool = np.asarray(pool, dtype=np.int64)
    if size < 1 or size > len(pool):
        raise MemlocError(f"ref_batch_size must be in 1..{len(pool)} (the size of the reference pool), got {size}",
                          argument="ref_batch_size")
    rng = np.random.default_rng([seed, 1])
    return np.stack([rng.choice(pool, size=size, replace=False) for _ in range(repeats)])
