"""A user's text file as a sequence corpus (``textfile:PATH``), with planted sequences (``inject``).

The file (UTF-8 text) is cut into non-overlapping ``seq_len``-byte windows, shuffled with ``seed``;
the first ``n_train`` are training sequences, the next ``n_test`` held out. Tokens are bytes (the
256-symbol vocabulary of :func:`memloc.canaries`; no BPE).

An inject file plants sequences, one per line as ``COUNT<TAB>TEXT`` (``3\\tmy key is 8141``: the text
ends 3 different training sequences, written over their last bytes, like Carlini et al.'s canaries;
blank lines and lines starting with ``#`` are skipped). Planted sequences are the memorisation targets
(kind ``canary``). The suffix measured is the last ``suffix_len`` bytes of every sequence: by default
half the shortest planted text (rounded down, at least 1; ``seq_len // 2`` with nothing planted), so
that it lies inside every planted text; ``prefix_len`` is the rest unless given.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .canaries import BYTE_VOCAB, byte_chunks, plant
from .errors import MemlocError
from .runtime import check_range
from .sequences import SequenceSet, check_span

__all__ = ["read_text", "read_inject", "sha256", "textfile"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_text(path, *, argument: str = "dataset", what: str = "corpus file") -> bytes:
    """The bytes of UTF-8 text file ``path``; a :class:`MemlocError` if it is missing, empty or not text."""
    path = Path(path)
    if not path.is_file():
        raise MemlocError(f"{what} {str(path)!r} does not exist (or is not a file)", argument=argument)
    data = path.read_bytes()
    if not data.strip():
        raise MemlocError(f"{what} {str(path)!r} is empty", argument=argument)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MemlocError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start} is not)",
                          argument=argument) from None
    if b"\0" in data:
        raise MemlocError(f"{what} {str(path)!r} is not text (it holds NUL bytes: a binary file?)", argument=argument)
    return data


def read_inject(path, data: bytes | None = None) -> list[tuple[int, bytes]]:
    """The ``(count, text)`` lines of inject file ``path`` (module docstring; ``data``: its bytes, if read)."""
    data = read_text(path, argument="inject", what="inject file") if data is None else data
    out = []
    for number, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        count, tab, text = line.partition("\t")
        if not tab or not count.strip().isdigit() or int(count) < 1 or not text:
            raise MemlocError(f"inject file {str(path)!r} line {number}: {line[:40]!r} is not COUNT<TAB>TEXT with "
                              "a count >= 1 and a non-empty text", argument="inject")
        out.append((int(count), text.encode()))
    if not out:
        raise MemlocError(f"inject file {str(path)!r} plants nothing (no COUNT<TAB>TEXT line)", argument="inject")
    return out


def _unchanged(what: str, path, expected: str | None, data: bytes) -> None:
    if expected is not None and sha256(data) != expected:
        raise MemlocError(f"{what} {str(path)!r} changed since the run was trained (sha256 {expected[:12]}..., now "
                          f"{sha256(data)[:12]}...): restore it to rebuild the run's sequences", argument="dataset")


def textfile(path, n_train: int | None = None, n_test: int | None = None, seq_len: int = 64, *, inject=None,
             prefix_len: int | None = None, suffix_len: int | None = None, seed: int = 0,
             sha: str | None = None, inject_sha: str | None = None) -> SequenceSet:
    """The :class:`SequenceSet` of text file ``path`` (module docstring). ``n_test``: default a tenth
    of the windows (at least 1); ``n_train``: default the rest. ``sha`` / ``inject_sha``: the files'
    expected sha256 (a run's), a :class:`MemlocError` if either file changed since."""
    seq_len = check_range("seq_len", seq_len, low=2, integer=True)
    data = read_text(path)
    _unchanged("corpus file", path, sha, data)
    planted = []
    if inject is not None:
        injected = read_text(inject, argument="inject", what="inject file")
        _unchanged("inject file", inject, inject_sha, injected)
        planted = read_inject(inject, injected)
    for number, (count, text) in enumerate(planted, 1):
        if len(text) > seq_len:
            raise MemlocError(f"inject file {str(inject)!r}: planted text {number} has {len(text)} bytes, more than "
                              f"seq_len {seq_len}", argument="inject")
    chunks = byte_chunks(data, seq_len)
    if len(chunks) < 2 and not (len(chunks) == 1 and n_test == 0):
        raise MemlocError(f"corpus file {str(path)!r} ({len(data)} bytes) gives {len(chunks)} sequence(s) of "
                          f"{seq_len} bytes; it needs at least 2 (a longer file or a smaller seq_len)", argument="seq_len")
    n_test = max(1, len(chunks) // 10) if n_test is None else n_test
    n_train = len(chunks) - n_test if n_train is None else n_train
    n_test = check_range("n_test", n_test, low=0, integer=True)
    n_train = check_range("n_train", n_train, low=1, integer=True)
    if n_train + n_test > len(chunks):
        raise MemlocError(f"corpus file {str(path)!r} gives {len(chunks)} sequences of {seq_len} bytes, fewer than "
                          f"n_train + n_test = {n_train + n_test}", argument="n_train")
    if sum(c for c, _ in planted) > n_train:
        raise MemlocError(f"the inject file plants {sum(c for c, _ in planted)} sequences, more than n_train = "
                          f"{n_train}", argument="inject")
    if suffix_len is None:
        suffix_len = (seq_len - prefix_len if prefix_len is not None else
                      max(1, min(len(t) for _, t in planted) // 2) if planted else seq_len // 2)
    prefix_len = seq_len - suffix_len if prefix_len is None else prefix_len
    check_span(prefix_len, suffix_len, seq_len)
    rng = np.random.default_rng(seed)
    chunks = [chunks[i] for i in rng.permutation(len(chunks))[:n_train + n_test]]
    train = np.frombuffer(b"".join(chunks[:n_train]), dtype=np.uint8).reshape(n_train, seq_len).astype(np.int64)
    test = np.frombuffer(b"".join(chunks[n_train:]), dtype=np.uint8).reshape(n_test, seq_len).astype(np.int64)
    kind = np.full(n_train, "clean", dtype=object)
    rows = plant(train, [t for _, t in planted], [c for c, _ in planted], rng)
    for mine in rows:
        kind[mine] = "canary"
    info = {"generator": "textfile", "encoding": "bytes", "path": str(path), "sha256": sha256(data),
            "planted": [{"text": t.decode(), "repeats": c, "rows": r.tolist()} for (c, t), r in zip(planted, rows)]}
    return SequenceSet(name="textfile", tokens=torch.from_numpy(train), test_tokens=torch.from_numpy(test),
                       ids=np.arange(n_train), is_memorised_target=kind == "canary", kind=kind.astype(str),
                       prefix_len=prefix_len, suffix_len=suffix_len, vocab=list(BYTE_VOCAB), info=info)
