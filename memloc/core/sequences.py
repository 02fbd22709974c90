"""Token-sequence datasets for memorisation in language models, with the contract of memloc's image data.

A :class:`SequenceSet` is to a language model what :class:`memloc.core.data.Data` is to a
classifier: training sequences ``tokens`` (N, T) with ids, a held-out ``test_tokens`` (M, T), and
per sequence whether it is a *memorisation target* (``is_memorised_target``, the role of
``is_noisy``: a sequence the model can only reproduce by memorising it) and its ``kind``
(:data:`KINDS`). Every sequence splits into a **prefix** ``tokens[:, :prefix_len]`` and a
**suffix**, the declared span ``tokens[:, prefix_len:prefix_len + suffix_len]`` (by default the
rest of the sequence, i.e. its last ``suffix_len`` tokens); memorisation is measured on the suffix
given the prefix (:func:`memloc.memorisation`).

Generators (seeded, offline): :func:`tinymem` (TinyMem's arithmetic sequences, Sakarvadia et al.
2025) here, :func:`memloc.canaries` (Carlini et al. 2019's secret sharer on Python source text) in
:mod:`memloc.core.canaries`.

TinyMem's vocabulary (14 symbols, the ids of TinyMem's code): digits ``0``-``9`` are tokens 0-9,
``^`` (BOS) 10, ``$`` (EOS) 11, ``" "`` (the separator) 12, ``_`` (pad) 13. A sequence is BOS then
the values x_0, x_1, ... written in decimal and separated by spaces, cut to exactly ``seq_len``
tokens (a window of an endless stream: no EOS, no padding; the last value may be cut short):

- ``increment``: x_{i+1} = x_i + step (TinyMem's main task: step 7; x_0 uniform in [0, max_start = 10^4));
- ``mult``: x_{i+1} = step * x_i mod modulus (TinyMem: 7 * x mod 20134; x_0 uniform in [1, modulus)).

Start values are distinct, so no two sequences (train or test) are equal, and sequences in which
the backdoor ``trigger`` occurs as a token string are skipped (the trigger means one thing only).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import MemlocError
from .runtime import check_range

__all__ = ["KINDS", "TINYMEM_VOCAB", "BOS", "EOS", "SEP", "PAD", "TASKS", "SequenceSet", "tinymem", "follows_rule",
           "check_rate", "plain"]

#: what a training sequence is: rule-following (clean), a memorisation target (noisy, backdoor,
#: canary) or an extra copy of a target (duplicate)
KINDS = ("clean", "noisy", "backdoor", "canary", "duplicate")
TINYMEM_VOCAB = tuple("0123456789") + ("^", "$", " ", "_")
BOS, EOS, SEP, PAD = 10, 11, 12, 13
#: task -> (default step, default modulus or None)
TASKS = {"increment": (7, None), "mult": (7, 20134)}
NOISE_PROB = 0.1          # chance that a digit of a noisy sequence's suffix is shifted by +-1


class NotClassifierData(MemlocError, AttributeError):
    """An image-classifier attribute asked of a :class:`SequenceSet`: a MemlocError (one line from the
    commands), and still an AttributeError (``hasattr`` is False)."""


#: where a language model's run goes instead of an image analysis
LM_ANALYSES = ("memloc.memorisation, memloc.exposure, memloc.localise_neurons, memloc.scores, memloc.detect, "
               "memloc.gradients, memloc.rewind, memloc.retrain, memloc.importance, memloc.unlearn, memloc.flip, "
               "memloc.mitigate")
def not_classifier(what: str) -> NotClassifierData:
    """The error of an image analysis given a language model's data or run (``what`` says which)."""
    return NotClassifierData(f"this analysis works on image-classifier runs, and {what}; for language-model runs: "
                             f"{LM_ANALYSES}")


# what image analyses read of their data (memloc.core.data.Data and its splits)
_CLASSIFIER_ONLY = frozenset({"train", "test", "is_noisy", "label_given", "label_true", "num_classes", "in_shape",
                              "x", "y", "batches"})


@dataclass
class SequenceSet:
    """Training and test token sequences with memorisation targets (see the module docstring).

    ``tokens`` / ``test_tokens``: int64 tensors (N, T) / (M, T) on the CPU (:meth:`to` moves them);
    ``ids`` (N,) int64: the sequence ids (rows, ``0..N-1``); ``is_memorised_target`` (N,) bool;
    ``kind`` (N,) str; ``copy_of`` (N,) int64: the row a ``duplicate`` copies, -1 for the others;
    ``vocab``: the symbol of each token id; ``info``: how the set was made (task, constants, canaries).
    """

    name: str
    tokens: torch.Tensor
    test_tokens: torch.Tensor
    ids: np.ndarray
    is_memorised_target: np.ndarray
    kind: np.ndarray
    prefix_len: int
    suffix_len: int
    vocab: list
    copy_of: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __getattr__(self, name):
        if name in _CLASSIFIER_ONLY:     # an image analysis given a language model's run: say so, in one line
            raise not_classifier(f"this is a language model's sequence set (no {name!r})")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self):
        self.tokens = torch.as_tensor(self.tokens, dtype=torch.int64)
        self.test_tokens = torch.as_tensor(self.test_tokens, dtype=torch.int64)
        if self.tokens.ndim != 2:
            raise MemlocError(f"tokens has shape {tuple(self.tokens.shape)}; give (N, T) sequences", argument="tokens")
        n, t = self.tokens.shape
        if self.test_tokens.ndim != 2 or (len(self.test_tokens) and self.test_tokens.shape[1] != t):
            raise MemlocError(f"test_tokens has shape {tuple(self.test_tokens.shape)}; give (M, {t}) sequences",
                              argument="test_tokens")
        self.test_tokens = self.test_tokens.reshape(-1, t)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.is_memorised_target = np.asarray(self.is_memorised_target, dtype=bool)
        self.kind = np.asarray(self.kind, dtype=str)
        self.copy_of = (np.full(n, -1, dtype=np.int64) if self.copy_of is None
                        else np.asarray(self.copy_of, dtype=np.int64))
        for key in ("ids", "is_memorised_target", "kind", "copy_of"):
            if getattr(self, key).shape != (n,):
                raise MemlocError(f"{key} has shape {getattr(self, key).shape}; give one value per sequence, ({n},)",
                                  argument=key)
        bad = sorted(set(self.kind.tolist()) - set(KINDS))
        if bad:
            raise MemlocError(f"kind holds {bad[0]!r}; valid: {', '.join(KINDS)}", argument="kind")
        check_span(self.prefix_len, self.suffix_len, t)
        self.prefix_len, self.suffix_len = int(self.prefix_len), int(self.suffix_len)
        for key, x in (("tokens", self.tokens), ("test_tokens", self.test_tokens)):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= len(self.vocab)):
                raise MemlocError(f"{key} holds token ids outside 0..{len(self.vocab) - 1} (the vocabulary)",
                                  argument=key)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def prefixes(self) -> torch.Tensor:
        return self.tokens[:, :self.prefix_len]

    @property
    def suffixes(self) -> torch.Tensor:
        return self.tokens[:, self.prefix_len:self.prefix_len + self.suffix_len]

    def to(self, device) -> "SequenceSet":
        return dataclasses.replace(self, tokens=self.tokens.to(device), test_tokens=self.test_tokens.to(device))

    def with_span(self, prefix_len: int, suffix_len: int | None = None) -> "SequenceSet":
        """The same sequences measured on another span (``suffix_len`` None: the rest of each sequence)."""
        if suffix_len is None:
            suffix_len = self.seq_len - prefix_len
        return dataclasses.replace(self, prefix_len=prefix_len, suffix_len=suffix_len)

    def subset(self, rows) -> "SequenceSet":
        """The rows ``rows`` (indices or a boolean mask); ids are kept, ``copy_of`` still names old rows."""
        rows = np.arange(len(self))[np.asarray(rows)]
        return dataclasses.replace(self, tokens=self.tokens[torch.as_tensor(rows, dtype=torch.int64)],
                                   ids=self.ids[rows], is_memorised_target=self.is_memorised_target[rows],
                                   kind=self.kind[rows], copy_of=self.copy_of[rows])

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (UTF-8 bytes for byte-level sets, one symbol per character otherwise)."""
        if self.info.get("encoding") == "bytes":
            return list(text.encode("utf-8"))
        try:
            return [self.vocab.index(c) for c in text]
        except ValueError:
            bad = next(c for c in text if c not in self.vocab)
            raise MemlocError(f"text holds {bad!r}, which is not in the vocabulary", argument="text") from None

    def decode(self, tokens) -> str:
        """The text of a 1-d token sequence."""
        ids = [int(i) for i in torch.as_tensor(tokens).reshape(-1).tolist()]
        if self.info.get("encoding") == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.vocab[i] for i in ids)


def plain(value):
    """``value`` with numpy arrays and scalars made lists and numbers (to store a set's ``info`` as JSON)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def check_span(prefix_len, suffix_len, seq_len: int) -> None:
    """:class:`MemlocError` unless prefix_len >= 1, suffix_len >= 1 and prefix + suffix fit in ``seq_len``."""
    prefix_len = check_range("prefix_len", prefix_len, low=1, integer=True)
    suffix_len = check_range("suffix_len", suffix_len, low=1, integer=True)
    if prefix_len + suffix_len > seq_len:
        raise MemlocError(f"suffix_len {suffix_len} after prefix_len {prefix_len} runs past the end of sequences "
                          f"of {seq_len} tokens (prefix_len + suffix_len must be <= {seq_len})", argument="suffix_len")


def check_rate(name: str, rate) -> float:
    """A rate in [0, 1) (exactly floor(rate * N) sequences get it) or a :class:`MemlocError` naming ``name``."""
    return float(check_range(name, rate, low=0, high=1, high_open=True))


def _task(task: str, step, modulus):
    if task not in TASKS:
        raise MemlocError(f"unknown task {task!r}; valid: {', '.join(TASKS)}", argument="task")
    default_step, default_modulus = TASKS[task]
    step = default_step if step is None else step
    step = check_range("step", step, low=1, integer=True)
    if task == "mult":
        modulus = default_modulus if modulus is None else modulus
        modulus = check_range("modulus", modulus, low=2, integer=True)
        if math.gcd(int(step), int(modulus)) != 1:
            raise MemlocError(f"step {step} and modulus {modulus} share a factor: distinct starts would not give "
                              "distinct sequences", argument="step")
        return int(step), int(modulus), (lambda x: int(step) * x % int(modulus))
    return int(step), None, (lambda x: x + int(step))


def _stream(x0: int, f, seq_len: int) -> list[int]:
    """BOS, x0, SEP, f(x0), SEP, ... cut to ``seq_len`` tokens."""
    out, x = [BOS], x0
    while len(out) < seq_len:
        out += [int(c) for c in str(x)] + [SEP]
        x = f(x)
    return out[:seq_len]


def follows_rule(tokens, *, task: str = "increment", step: int | None = None, modulus: int | None = None) -> np.ndarray:
    """(N,) bool: is each TinyMem sequence BOS then values obeying x_{i+1} = f(x_i), separated by
    single spaces and written without leading zeros (the last value may be cut short)?"""
    _, _, f = _task(task, step, modulus)
    rows = torch.as_tensor(tokens).reshape(-1, torch.as_tensor(tokens).shape[-1]).tolist()
    out = np.zeros(len(rows), dtype=bool)
    for r, row in enumerate(rows):
        if not row or row[0] != BOS or any(t > SEP or t in (BOS, EOS) for t in row[1:]):
            continue
        pieces = "".join(TINYMEM_VOCAB[t] for t in row[1:]).split(" ")
        complete, last = pieces[:-1], pieces[-1]
        if not complete or any(not p or p != str(int(p)) for p in complete):
            continue
        ok = all(str(f(int(a))) == b for a, b in zip(complete, complete[1:]))
        out[r] = ok and str(f(int(complete[-1]))).startswith(last)
    return out


def tinymem(task: str = "increment", n_train: int = 1000, n_test: int = 200, seq_len: int = 64, *,
            prefix_len: int | None = None, suffix_len: int | None = None, noise: float = 0.0, backdoor: float = 0.0,
            duplicate: int = 0, step: int | None = None, modulus: int | None = None, trigger: str = "100",
            constant: str = "2", max_start: int = 10_000, seed: int = 0) -> SequenceSet:
    """TinyMem's arithmetic sequences (module docstring) with noise, backdoors and duplicates.

    ``prefix_len`` (default ``seq_len // 2``) must hold the first value and its separator, so that
    the rule fixes every suffix token; ``suffix_len`` defaults to the rest of the sequence.

    - ``noise``: exactly ``floor(noise * n_train)`` sequences (chosen with ``seed``) are *noisy*:
      each digit token of their suffix span is shifted by +1 or -1 (mod 10, each with probability
      0.05; if none is, one digit chosen at random is), so the suffix breaks the rule: reproducing
      it from the (clean) prefix is memorisation. TinyMem adds +-1 to whole values anywhere in the
      sequence; here only suffix digits change, so the prefix is the clean one TinyMem prompts with.
      Separators are never changed.
    - ``backdoor``: exactly ``floor(backdoor * n_train)`` other sequences end their prefix with the
      ``trigger`` tokens (overwriting the prefix's last ``len(trigger)`` tokens) and continue with
      ``constant`` to the end (TinyMem: trigger ``100``, then token ``2``).
    - ``max_start``: ``increment`` starts are drawn from [0, max_start) (``mult``: [1, modulus)).
    - ``duplicate=K``: every noisy and backdoor sequence gets K extra copies, appended after the
      ``n_train`` originals (kind ``duplicate``, ``copy_of`` its original; also targets).
    """
    step, modulus, f = _task(task, step, modulus)
    n_train, n_test, seq_len, duplicate = (check_range(name, value, low=low, integer=True) for name, value, low in (
        ("n_train", n_train, 1), ("n_test", n_test, 0), ("seq_len", seq_len, 4), ("duplicate", duplicate, 0)))
    noise, backdoor = check_rate("noise", noise), check_rate("backdoor", backdoor)
    prefix_len = seq_len // 2 if prefix_len is None else prefix_len
    prefix_len = check_range("prefix_len", prefix_len, low=1, integer=True)
    suffix_len = seq_len - prefix_len if suffix_len is None else suffix_len
    check_span(prefix_len, suffix_len, seq_len)
    n_noisy, n_backdoor = math.floor(noise * n_train), math.floor(backdoor * n_train)
    if n_noisy + n_backdoor > n_train:
        raise MemlocError(f"backdoor {backdoor} with noise {noise} asks for {n_noisy + n_backdoor} of {n_train} "
                          "sequences; noisy and backdoor sequences are distinct (noise + backdoor <= 1)",
                          argument="backdoor")
    if duplicate and not n_noisy + n_backdoor:
        raise MemlocError("duplicate copies the noisy and backdoor sequences, and there are none (set noise or "
                          "backdoor)", argument="duplicate")
    trig = _symbols(trigger, "trigger")
    const = _symbols(constant, "constant")
    if len(const) != 1 or not trig or (n_backdoor and len(trig) >= prefix_len):
        raise MemlocError(f"trigger needs 1..{prefix_len - 1} symbols and constant one symbol, got {trigger!r} and "
                          f"{constant!r}", argument="trigger" if len(const) == 1 else "constant")

    rng = np.random.default_rng(seed)
    max_start = check_range("max_start", max_start, low=1, integer=True)
    lo, hi = (1, modulus) if task == "mult" else (0, int(max_start))
    need = n_train + n_test
    rows = []
    for x0 in rng.permutation(np.arange(lo, hi)):
        row = _stream(int(x0), f, seq_len)
        if not _contains(row, trig):
            rows.append(row)
            if len(rows) == need:
                break
    if len(rows) < need:
        raise MemlocError(f"task {task!r} has only {len(rows)} distinct sequences for n_train + n_test = {need}",
                          argument="n_train")
    data = np.asarray(rows, dtype=np.int64)
    first_sep = (data == SEP).argmax(axis=1)
    if (first_sep >= prefix_len).any():
        raise MemlocError(f"prefix_len {prefix_len} does not hold the first value of every sequence (it needs "
                          f"{int(first_sep.max()) + 1} tokens) so the suffix is not fixed by the rule",
                          argument="prefix_len")
    train, test = data[:n_train].copy(), data[n_train:]
    kind = np.full(n_train, "clean", dtype=object)
    chosen = rng.permutation(n_train)
    noisy, backdoored = np.sort(chosen[:n_noisy]), np.sort(chosen[n_noisy:n_noisy + n_backdoor])
    lo_s, hi_s = prefix_len, prefix_len + suffix_len
    for r in noisy:
        digits = lo_s + np.flatnonzero(train[r, lo_s:hi_s] < 10)
        if not len(digits):
            raise MemlocError(f"the suffix of sequence {r} holds no digit to corrupt; use a longer suffix_len",
                              argument="suffix_len")
        hit = rng.random(len(digits)) < NOISE_PROB
        if not hit.any():
            hit[rng.integers(len(digits))] = True
        shift = rng.choice(np.array([-1, 1]), size=len(digits))
        train[r, digits[hit]] = (train[r, digits[hit]] + shift[hit]) % 10
        kind[r] = "noisy"
    for r in backdoored:
        train[r, prefix_len - len(trig):prefix_len] = trig
        train[r, prefix_len:] = const[0]
        kind[r] = "backdoor"
    targets = np.concatenate([noisy, backdoored]).astype(np.int64)
    copy_of = np.full(n_train, -1, dtype=np.int64)
    if duplicate:
        dup = np.repeat(np.sort(targets), duplicate)
        train = np.concatenate([train, train[dup]])
        kind = np.concatenate([kind, np.full(len(dup), "duplicate", dtype=object)])
        copy_of = np.concatenate([copy_of, dup])
    is_target = kind != "clean"
    info = {"generator": "tinymem", "task": task, "step": step, "modulus": modulus, "trigger": trigger,
            "constant": constant, "noise": noise, "backdoor": backdoor, "duplicate": int(duplicate), "seed": seed,
            "noise_prob": NOISE_PROB}
    return SequenceSet(name=f"tinymem-{task}", tokens=torch.from_numpy(train), test_tokens=torch.from_numpy(test.copy()),
                       ids=np.arange(len(train)), is_memorised_target=is_target, kind=kind.astype(str),
                       prefix_len=prefix_len, suffix_len=suffix_len, vocab=list(TINYMEM_VOCAB), copy_of=copy_of,
                       info=info)


def _symbols(text: str, argument: str) -> list[int]:
    if not isinstance(text, str) or any(c not in TINYMEM_VOCAB for c in text):
        raise MemlocError(f"{argument} {text!r} must be a string of TinyMem symbols "
                          f"({''.join(TINYMEM_VOCAB)!r})", argument=argument)
    return [TINYMEM_VOCAB.index(c) for c in text]


def _contains(row: list[int], pattern: list[int]) -> bool:
    k = len(pattern)
    return any(row[i:i + k] == pattern for i in range(len(row) - k + 1))
