"""Exposure of a secret (Carlini et al. 2019, "The Secret Sharer"), exact or estimated by sampling.

A model's exposure of a secret ``s`` among a candidate space ``C`` (all secrets of the same format,
e.g. the 10^4 four-digit PINs), given a ``prefix`` (the context before the secret):

    exposure = log2 |C| - log2 rank(s)

where rank(s) = 1 + the number of candidates with a strictly higher sequence log-likelihood
log p(candidate | prefix) (ties count in the secret's favour). It is log2 |C| when the secret is
the most likely candidate and 0 when it is the least likely.

:func:`exposure` scores every candidate (exact; for spaces up to :data:`MAX_EXACT`, in batches).
:func:`exposure_estimate` is the paper's sampling estimate for large spaces: the log-perplexities
(negative log-likelihoods) of ``samples`` candidates drawn uniformly give the distribution of a
random candidate's log-perplexity, and exposure = -log2 P(random candidate is more likely than the
secret). ``method="skewnorm"`` (the paper's): fit a skew-normal distribution to the sampled
log-perplexities and take its CDF at the secret's (clipped to [0, log2 |C|]); ``"empirical"``: the
fraction q of samples more likely than the secret, exposure = -log2(q + 1/|C|) (which is the exact
exposure when the "samples" are the whole space).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import MemlocError
from ..core.lm import lm_logits
from ..core.runtime import as_number, check_range, in_range, resolve_device

__all__ = ["MAX_EXACT", "ESTIMATES", "CandidateSpace", "digit_space", "sequence_log_likelihood", "exposure",
           "exposure_estimate"]

MAX_EXACT = 1_000_000
ESTIMATES = ("skewnorm", "empirical")


@dataclass(frozen=True)
class CandidateSpace:
    """Every sequence whose token at position i is one of ``choices[i]`` (a product space)."""

    choices: tuple

    def __post_init__(self):
        try:
            choices = tuple(tuple(_token_id(t) for t in c) for c in self.choices)
        except TypeError:
            raise MemlocError("candidates: give the token ids allowed at each position (a tuple of tuples)",
                              argument="candidates") from None
        if not choices or any(not c or len(set(c)) != len(c) for c in choices):
            raise MemlocError("candidates: every position needs at least one token id, without repeats",
                              argument="candidates")
        object.__setattr__(self, "choices", choices)

    @property
    def size(self) -> int:
        return math.prod(len(c) for c in self.choices)

    def __len__(self) -> int:
        return self.size

    @property
    def length(self) -> int:
        return len(self.choices)

    def __contains__(self, secret) -> bool:
        s = [int(t) for t in secret]
        return len(s) == self.length and all(t in c for t, c in zip(s, self.choices))

    def enumerate(self) -> np.ndarray:
        """(|C|, length) int64, in lexicographic order of the choices."""
        return np.array(list(itertools.product(*self.choices)), dtype=np.int64).reshape(self.size, self.length)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, length) candidates drawn uniformly (with replacement)."""
        return np.stack([np.asarray(c, dtype=np.int64)[rng.integers(len(c), size=n)] for c in self.choices], axis=1)


def _token_id(t) -> int:
    if not in_range(t, 0, integer=True):
        raise MemlocError(f"candidates: token ids are integers >= 0, got {t!r}", argument="candidates")
    return int(t)


def digit_space(n_digits: int, *, digits=range(10), separator: int | None = None) -> CandidateSpace:
    """``n_digits`` digit tokens (``digits``: their ids), with ``separator`` between them if given:
    ``digit_space(4)`` is TinyMem's 10^4 four-digit secrets; ``digit_space(6, digits=range(48, 58),
    separator=32)`` the byte-level "3 8 1 4 9 2" of :func:`memloc.canaries`."""
    n_digits = check_range("n_digits", n_digits, low=1, integer=True)
    if separator is not None and not in_range(separator, 0, integer=True):
        raise MemlocError(f"separator must be a token id (an integer >= 0) or None, got {separator!r}",
                          argument="separator")
    separator = None if separator is None else int(as_number(separator))
    if isinstance(digits, (str, dict)) or not hasattr(digits, "__iter__"):
        raise MemlocError(f"digits must be the token ids of the digits (e.g. range(10)), got {digits!r}",
                          argument="digits")
    d = tuple(digits)
    positions = [d]
    for _ in range(n_digits - 1):
        positions += ([(separator,)] if separator is not None else []) + [d]
    return CandidateSpace(tuple(positions))


def _ids(x, argument: str, what: str) -> torch.Tensor | None:
    """``x`` as an int64 tensor of token ids (>= 0); None when it is not one (its caller says what it needs)."""
    try:
        t = None if x is None else torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x))
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        return None
    if t.numel() and int(t.min()) < 0:
        raise MemlocError(f"{argument} holds a negative token id; give {what}", argument=argument)
    return t.long().cpu()


def _vector(x, argument: str) -> torch.Tensor:
    t = _ids(x, argument, "a non-empty sequence of token ids")
    if t is None or t.numel() == 0:
        raise MemlocError(f"{argument} must be a non-empty sequence of token ids", argument=argument)
    return t.reshape(-1)


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise MemlocError(f"model must be a causal language model (a torch.nn.Module), got {type(model).__name__}",
                          argument="model")


@torch.no_grad()
def sequence_log_likelihood(model, prefix, continuations, *, eval_batch_size: int = 1024,
                            device="auto") -> np.ndarray:
    """(C,) float64: log p(continuation | prefix) in nats, the sum over the continuation's tokens of
    the model's log-probabilities (one forward pass per batch of ``eval_batch_size`` continuations)."""
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    _check_model(model)
    device = resolve_device(device)
    prefix = _vector(prefix, "prefix")
    cont = _ids(continuations, "candidates", "(C, S) token ids")
    if cont is None or cont.ndim != 2 or cont.shape[1] < 1:
        raise MemlocError(f"candidates has shape {tuple(np.shape(continuations))}; give (C, S) token ids",
                          argument="candidates")
    was_training = model.training
    model.to(device).eval()
    p, out = len(prefix), []
    try:
        for i in range(0, len(cont), eval_batch_size):
            c = cont[i:i + eval_batch_size].to(device)
            x = torch.cat([prefix.to(device).expand(len(c), p), c[:, :-1]], dim=1)
            logp = torch.log_softmax(lm_logits(model, x)[:, p - 1:].float(), dim=-1)
            out.append(logp.gather(2, c.unsqueeze(2)).squeeze(2).double().sum(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def _candidates(candidates, secret: torch.Tensor):
    """(rows (C, S) or None, the space or None, |C|), with the secret checked to be a candidate."""
    if isinstance(candidates, CandidateSpace):
        if [int(t) for t in secret] not in candidates:
            raise MemlocError("secret is not in the candidate space (its length or a token is outside the choices)",
                              argument="secret")
        return None, candidates, candidates.size
    rows = _ids(candidates, "candidates", f"(C, {len(secret)}) token ids")
    if rows is None or rows.ndim != 2 or rows.shape[1] != len(secret):
        raise MemlocError(f"candidates has shape {tuple(np.shape(candidates))}; give (C, {len(secret)}) token ids (as "
                          "long as the secret) or a CandidateSpace", argument="candidates")
    if not (rows == secret).all(1).any():
        raise MemlocError("secret is not among the candidates", argument="secret")
    return rows, None, len(rows)


def exposure(model, prefix, secret, candidates, *, eval_batch_size: int = 1024, device="auto") -> float:
    """Exact exposure (module docstring) of ``secret`` (S token ids) after ``prefix`` among
    ``candidates``: a (C, S) array of token ids holding the secret, or a :class:`CandidateSpace`
    (every member is scored; at most :data:`MAX_EXACT`)."""
    _check_model(model)
    secret = _vector(secret, "secret")
    rows, space, size = _candidates(candidates, secret)
    if space is not None:
        if size > MAX_EXACT:
            raise MemlocError(f"candidates holds {size} sequences, more than {MAX_EXACT} to score exactly; use "
                              "exposure_estimate", argument="candidates")
        rows = torch.from_numpy(space.enumerate())
    ll = sequence_log_likelihood(model, prefix, rows, eval_batch_size=eval_batch_size, device=device)
    mine = ll[int(torch.nonzero((rows == secret).all(1))[0, 0])]
    rank = 1 + int((ll > mine).sum())
    return math.log2(size) - math.log2(rank)


def exposure_estimate(model, prefix, secret, candidates, *, samples: int = 10_000, method: str = "skewnorm",
                      seed: int = 0, eval_batch_size: int = 1024, device="auto") -> float:
    """Exposure estimated from ``samples`` candidates drawn uniformly (with replacement, ``seed``)
    from ``candidates`` (a :class:`CandidateSpace` or a (C, S) array), by ``method`` ``skewnorm``
    or ``empirical`` (module docstring)."""
    if method not in ESTIMATES:
        raise MemlocError(f"method {method!r} is unknown; valid: {', '.join(ESTIMATES)}", argument="method")
    samples = check_range("samples", samples, low=2, integer=True)
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    _check_model(model)
    secret = _vector(secret, "secret")
    rows, space, size = _candidates(candidates, secret)
    rng = np.random.default_rng(seed)
    drawn = space.sample(samples, rng) if space is not None else rows[rng.integers(size, size=samples)].numpy()
    kw = dict(eval_batch_size=eval_batch_size, device=device)
    nll = -sequence_log_likelihood(model, prefix, drawn, **kw)
    mine = -sequence_log_likelihood(model, prefix, secret[None], **kw)[0]
    top = math.log2(size)
    if method == "empirical":
        return min(top, -math.log2(float((nll < mine).mean()) + 1.0 / size))
    from scipy import stats
    if np.ptp(nll) == 0:           # every sample equally likely: no spread to fit
        return top if mine <= nll[0] else 0.0
    shape, loc, scale = stats.skewnorm.fit(nll)
    log_cdf = float(stats.skewnorm.logcdf(mine, shape, loc, scale))
    return float(min(top, max(0.0, -log_cdf / math.log(2))))
