"""Carlini et al. (2019)'s secret sharer: canaries planted in text, as a :class:`SequenceSet`.

The text is the Python standard library's own source (the ``*.py`` files beside ``os``, found
through :mod:`sysconfig`), so it is offline and needs no download; its exact bytes depend on the
Python version (recorded in ``info["python"]``). Tokens are bytes (a 256-symbol vocabulary, no BPE).
"""
from __future__ import annotations

import inspect
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from .errors import MemlocError
from .runtime import check_range
from .sequences import SequenceSet

__all__ = ["NAMES", "BYTE_VOCAB", "canaries", "stdlib_sources", "byte_chunks", "plant"]

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
#: token id -> symbol (the byte's Latin-1 character)
BYTE_VOCAB = [bytes([i]).decode("latin-1") for i in range(256)]


def stdlib_sources() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name."""
    root = sysconfig.get_paths().get("stdlib") or os.path.dirname(inspect.getsourcefile(os))
    files = sorted(Path(root).glob("*.py"))
    if not files:
        raise MemlocError(f"found no Python source files in the standard library folder {root!r}")
    return files


def canaries(n_train: int = 1024, n_test: int = 128, seq_len: int = 128, *, repeats=(1, 4, 16, 64),
             n_digits: int = 6, names=NAMES, seed: int = 0) -> SequenceSet:
    """Text chunks of the standard library's source with secrets planted ``repeats`` times.

    Each ``r`` in ``repeats`` gets its own canary ``"<name> pin d d d d d d"`` (``n_digits`` random
    digits separated by spaces, drawn with ``seed``) that ends ``r`` training sequences: each of
    those is a different chunk of source text whose last bytes are replaced by the canary. The other
    training sequences and the ``n_test`` test sequences are plain chunks (non-overlapping
    ``seq_len``-byte windows of the files, shuffled with ``seed``). The suffix is the secret, the
    last ``2 * n_digits - 1`` bytes of every sequence (``prefix_len`` is the rest), so
    :func:`memloc.memorisation` tells whether greedy decoding extracts it; ``info["canaries"]``
    lists each canary's name, text, secret, its prefix text (``"alice pin "``), ``repeats`` and rows,
    for :func:`memloc.exposure`. Canary sequences are the memorisation targets (kind ``canary``).
    """
    n_train, n_test, n_digits = (check_range(key, value, low=low, integer=True) for key, value, low in (
        ("n_train", n_train, 1), ("n_test", n_test, 0), ("n_digits", n_digits, 1)))
    repeats = [repeats] if np.ndim(repeats) == 0 else list(repeats)
    repeats = [check_range("repeats", r, low=1, integer=True) for r in repeats]
    names = list(names)
    if len(names) < len(repeats) or len(set(names)) != len(names):
        raise MemlocError(f"names needs {len(repeats)} distinct names (one per repeat count), got {names}",
                          argument="names")
    if sum(repeats) > n_train:
        raise MemlocError(f"repeats plant {sum(repeats)} canary sequences, more than n_train = {n_train}",
                          argument="repeats")
    rng = np.random.default_rng(seed)
    planted = []
    for name, r in zip(names, repeats):
        secret = " ".join(str(d) for d in rng.integers(0, 10, n_digits))
        planted.append({"name": name, "prefix_text": f"{name} pin ", "secret": secret,
                        "text": f"{name} pin {secret}", "repeats": int(r)})
    longest = max(len(c["text"].encode()) for c in planted)
    seq_len = check_range("seq_len", seq_len, low=longest + 1, integer=True)
    need = n_train + n_test
    chunks, used = [], []
    files = stdlib_sources()
    for path in (files[i] for i in rng.permutation(len(files))):
        chunks += byte_chunks(path.read_bytes(), seq_len)
        used.append(path.name)
        if len(chunks) >= need:
            break
    if len(chunks) < need:
        raise MemlocError(f"the standard library's source gives {len(chunks)} chunks of {seq_len} bytes, fewer than "
                          f"n_train + n_test = {need}", argument="n_train")
    chunks = [chunks[i] for i in rng.permutation(len(chunks))[:need]]
    train = np.frombuffer(b"".join(chunks[:n_train]), dtype=np.uint8).reshape(n_train, seq_len).astype(np.int64)
    test = np.frombuffer(b"".join(chunks[n_train:]), dtype=np.uint8).reshape(n_test, seq_len).astype(np.int64)
    kind = np.full(n_train, "clean", dtype=object)
    for c, mine in zip(planted, plant(train, [c["text"].encode() for c in planted], [c["repeats"] for c in planted],
                                      rng)):
        kind[mine] = "canary"
        c["rows"] = mine.tolist()
    suffix_len = 2 * n_digits - 1
    info = {"generator": "canaries", "encoding": "bytes", "canaries": planted, "seed": seed,
            "sources": used, "python": sys.version.split()[0]}
    return SequenceSet(name="canaries", tokens=torch.from_numpy(train), test_tokens=torch.from_numpy(test),
                       ids=np.arange(n_train), is_memorised_target=kind == "canary", kind=kind.astype(str),
                       prefix_len=seq_len - suffix_len, suffix_len=suffix_len, vocab=list(BYTE_VOCAB), info=info)


def byte_chunks(data: bytes, seq_len: int) -> list[bytes]:
    """The non-overlapping ``seq_len``-byte windows of ``data`` (a shorter tail is dropped)."""
    return [data[i:i + seq_len] for i in range(0, len(data) - seq_len + 1, seq_len)]


def plant(train: np.ndarray, texts: list[bytes], repeats: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Write each of ``texts`` over the last bytes of ``repeats[i]`` distinct rows of ``train`` (N, T)
    in place (rows drawn without replacement with ``rng``, no row twice); the rows of each, sorted."""
    rows, start, out = rng.permutation(len(train)), 0, []
    for text, r in zip(texts, repeats):
        mine = np.sort(rows[start:start + r])
        start += r
        train[mine, train.shape[1] - len(text):] = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
        out.append(mine)
    return out
