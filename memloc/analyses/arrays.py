"""Label issues and scores from plain arrays, cleanlab style: no run, no model, arrays in, arrays out.

``estimate_joint(labels, pred_probs)`` and ``estimate_noise_rate(labels, pred_probs)`` estimate how
the given labels are corrupted; ``rank_label_issues`` and ``find_label_issues_in_arrays`` rank and
flag the suspects; ``scores_from_arrays`` turns recorded training dynamics into the scores of
:mod:`memloc.analyses.scores`. ``labels`` (N,) are the given labels, integers in 0..C-1;
``pred_probs`` (N, C) are predicted class probabilities (rows summing to 1), ideally out-of-sample
(cross-validated, or an early checkpoint as :func:`memloc.find_label_issues` uses).
:func:`memloc.find_label_issues` is these functions fed from a run's records.

Only numpy is imported with this module: the estimates and the ranking from ``pred_probs`` need
nothing else (scipy is loaded for percentile ranks, pandas for the table); the functions that read
the score registry or compute EL2N load :mod:`memloc.analyses.scores` (and torch) when called.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..core.errors import MemlocError
from ..core.numeric import check_range

__all__ = ["COMBINED", "SELF_CONFIDENCE", "estimate_joint", "estimate_noise_rate", "rank_label_issues",
           "find_label_issues_in_arrays", "scores_from_arrays", "suspicion", "flag_top"]

COMBINED = ("confidence", "el2n", "aum")
SELF_CONFIDENCE = "self_confidence"      # by=: 1 - pred_probs[i, labels[i]], needs only pred_probs
PROB_TOLERANCE = 1e-3                    # how far a row of pred_probs may sum from 1


# ----------------------------------------------------------------------------- checks
def _floats(values, argument: str) -> np.ndarray:
    """``values`` as a float64 array; :class:`MemlocError` naming ``argument`` when they are not numbers."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MemlocError(f"{argument} must hold numbers (an array), got {type(values).__name__}",
                          argument=argument) from None


def _check_labels(labels, argument: str = "labels", num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise MemlocError(f"{argument} has shape {y.shape}; give one integer label per example, shape (N,)",
                          argument=argument)
    if y.dtype.kind not in "iub":
        if y.dtype.kind != "f" or not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise MemlocError(f"{argument} must hold integer class labels (got dtype {y.dtype})", argument=argument)
    y = y.astype(np.int64)
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise MemlocError(f"{argument} holds {bad}, outside 0..{num_classes - 1} ({num_classes} classes)",
                          argument=argument)
    return y


def _check_probs(labels, pred_probs) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int64, pred_probs (N, C) float64), checked against each other."""
    y = _check_labels(labels)
    p = _floats(pred_probs, "pred_probs")
    n = len(y)
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
        raise MemlocError(f"pred_probs has shape {p.shape}; give one row of at least 2 class probabilities per "
                          f"label, shape ({n}, C)", argument="pred_probs")
    if not np.isfinite(p).all():
        raise MemlocError("pred_probs holds values that are not finite", argument="pred_probs")
    sums = p.sum(axis=1)
    if p.min() < 0 or np.abs(sums - 1).max(initial=0) > PROB_TOLERANCE:
        raise MemlocError(f"pred_probs must be probabilities: rows of non-negative values summing to 1 (a row "
                          f"sums to {sums[np.argmax(np.abs(sums - 1))]:.6g}; softmax logits first)",
                          argument="pred_probs")
    return _check_labels(y, num_classes=p.shape[1]), p


def _check_epochs(values, argument: str, n: int | None) -> np.ndarray:
    v = _floats(values, argument)
    if v.ndim != 2 or (n is not None and v.shape[1] != n):
        want = f"(E, {n})" if n is not None else "(E, N)"
        raise MemlocError(f"{argument} has shape {v.shape}; give one row per epoch, shape {want}", argument=argument)
    return v


# ----------------------------------------------------------------------------- the noise estimate
def _calibrated_joint_counts(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C, C) calibrated confident joint in counts: entry (i, j) estimates how many examples are
    labelled i and truly j; row i sums to the number of examples labelled i."""
    c = probs.shape[1]
    counts = np.bincount(labels, minlength=c)
    # per-class thresholds, less a hair so that examples tied at the mean count (as cleanlab does)
    thresholds = np.array([probs[labels == j, j].mean() - 1e-6 if counts[j] else np.inf for j in range(c)])
    above = probs >= thresholds
    has = above.any(axis=1)
    pred = np.where(above, probs, -1.0).argmax(axis=1)
    joint = np.zeros((c, c))
    np.add.at(joint, (labels[has], pred[has]), 1.0)
    rows = joint.sum(axis=1, keepdims=True)
    return np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0) * counts[:, None]


def estimate_joint(labels, pred_probs) -> np.ndarray:
    """The joint distribution of given and true labels: the calibrated confident joint of confident
    learning (Northcutt et al. 2021), normalised to sum to 1.

    ``labels`` (N,) given labels in 0..C-1; ``pred_probs`` (N, C) probabilities. Returns (C, C):
    entry (i, j) estimates P(given label = i, true label = j); row i sums to the fraction of
    examples labelled i. Per class j the threshold t_j is the mean of ``pred_probs[:, j]`` over the
    examples labelled j (less 1e-6); an example labelled i is counted at (i, j) where j is the most
    probable of its classes with p_j >= t_j (not counted if none is); each row of counts is then
    scaled to the number of examples labelled i, and the whole divided by N.

    Against ``cleanlab.count.estimate_joint`` (2.9), whose steps are the same otherwise:

    * cleanlab rounds the calibrated counts to integers (preserving row totals), so its entries are
      multiples of 1/N; these are not rounded (each entry differs by less than 1/N);
    * cleanlab sets every raw diagonal count below 1 to 1 before calibrating; where a class has
      no example counted as labelled-and-truly that class, the two rows differ;
    * with two or more classes above threshold cleanlab takes the argmax over *all* classes, which
      may be a class below its threshold; here it is the argmax over the classes above threshold
      (the paper's definition); with exactly one class above threshold both take it;
    * cleanlab clips thresholds below at 2e-6 (a class whose mean probability is below that).

    Where none of these arises, rounding this joint x N as cleanlab does gives cleanlab's joint
    exactly (``tests/test_arrays.py``).
    """
    labels, probs = _check_probs(labels, pred_probs)
    return _calibrated_joint_counts(labels, probs) / len(labels)


def estimate_noise_rate(labels, pred_probs) -> float:
    """The fraction of examples whose given label is wrong: the off-diagonal mass of
    :func:`estimate_joint` (1 - trace(counts) / N, computed on the unnormalised counts).
    ``labels`` (N,), ``pred_probs`` (N, C) -> float in [0, 1]."""
    labels, probs = _check_probs(labels, pred_probs)
    return float(1.0 - np.trace(_calibrated_joint_counts(labels, probs)) / len(labels))


# ----------------------------------------------------------------------------- ranking and flags
def _percentile_rank(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    v = np.asarray(values, dtype=np.float64)
    out = np.full(len(v), np.nan)
    ok = np.isfinite(v)
    out[ok] = rankdata(v[ok]) / max(ok.sum(), 1)
    return out


def suspicion(table: dict[str, np.ndarray], by: str) -> np.ndarray:
    """Higher = more suspicious: ``direction x score``, or for ``combined`` the mean rank percentile
    of the :data:`COMBINED` scores (each turned by its direction). ``table``: name -> (N,)."""
    from .scores import SCORES
    if by == "combined":
        with warnings.catch_warnings():     # an example no score defines stays NaN (ranked last)
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean([_percentile_rank(SCORES[n].direction * table[n]) for n in COMBINED], axis=0)
    return SCORES[by].direction * np.asarray(table[by], dtype=np.float64)


def flag_top(values: np.ndarray, count: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rank (N,) 1 = highest value, flagged (N,) bool = the ``count`` highest); NaN ranks last.
    Ties are broken by a permutation seeded with ``seed`` (deterministic, and unbiased where ids
    follow the classes, as in mnist5k; integer scores such as forgetting counts tie a lot)."""
    v = np.asarray(values, dtype=np.float64)
    key = np.where(np.isfinite(v), -v, np.inf)
    order = np.lexsort((np.random.default_rng(seed).permutation(len(v)), key))
    rank = np.empty(len(v), dtype=np.int64)
    rank[order] = np.arange(1, len(v) + 1)
    return rank, rank <= count


def _check_scores(scores, n: int) -> dict[str, np.ndarray]:
    if not isinstance(scores, dict):
        raise MemlocError(f"scores must be a dict of score name -> ({n},) array, not {type(scores).__name__}",
                          argument="scores")
    table = {str(k): np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    for name, v in table.items():
        if v.shape != (n,):
            raise MemlocError(f"scores[{name!r}] has shape {v.shape}; give one value per label, shape ({n},)",
                              argument="scores")
    return table


def rank_label_issues(labels, pred_probs=None, *, scores=None, by: str = "combined",
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every example's suspicion (higher = more likely mislabelled) and rank (1 = most suspicious).

    ``labels`` (N,) given labels. ``pred_probs`` (N, C) probabilities, or None. ``scores``: score
    name (of :data:`memloc.analyses.scores.SCORES`) -> (N,) raw values, e.g. from
    :func:`scores_from_arrays`, NaN = undefined. ``by``:

    * ``"combined"``: with ``scores``, the mean rank percentile of :data:`COMBINED` (confidence,
      EL2N, AUM, each turned so that high = suspicious; all three needed); without ``scores``,
      the self-confidence rule below;
    * ``"self_confidence"``: 1 - ``pred_probs[i, labels[i]]``;
    * a score name: ``direction x scores[by]``.

    Returns (suspicion (N,) float, rank (N,) int, a permutation of 1..N). Ties are broken by a
    permutation seeded with ``seed``; NaN suspicion ranks last.
    """
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    y = _check_labels(labels)
    if pred_probs is not None:
        y, probs = _check_probs(y, pred_probs)
    table = None if scores is None else _check_scores(scores, len(y))
    if by == SELF_CONFIDENCE or (by == "combined" and table is None):
        if pred_probs is None:
            raise MemlocError("{by} needs pred_probs" + ("" if by == SELF_CONFIDENCE else " or scores"),
                              argument="pred_probs", options={"by": by})
        values = 1.0 - probs[np.arange(len(y)), y]
    else:
        from .scores import SCORES
        if by != "combined" and (not isinstance(by, str) or by not in SCORES):
            raise MemlocError(f"by {by!r} is not a score; valid: combined, {SELF_CONFIDENCE}, {', '.join(SCORES)}",
                              argument="by")
        needed = COMBINED if by == "combined" else (by,)
        missing = [name for name in needed if table is None or name not in table]
        if missing:
            raise MemlocError(f"{{by}} needs scores {', '.join(missing)}", argument="scores", options={"by": by})
        values = suspicion(table, by)
    return values, flag_top(values, 0, seed=seed)[0]


def find_label_issues_in_arrays(labels, pred_probs, *, rate: float | None = None, scores=None,
                                by: str = "combined", seed: int = 0):
    """The suspects among ``labels``: the top round(rate x N) of :func:`rank_label_issues`.

    ``labels`` (N,), ``pred_probs`` (N, C); ``scores``, ``by``, ``seed`` as in
    :func:`rank_label_issues`. ``rate``: the fraction to flag, in [0, 1]; default
    :func:`estimate_noise_rate`. Returns a ``pandas.DataFrame``, one row per example in id order
    (index ``id``): ``is_label_issue`` (bool), ``rank`` (1 = most suspicious), ``suspicion``,
    ``label_given``, ``label_predicted`` (argmax of ``pred_probs``: the relabelling candidate),
    ``prob_given``; ``df.attrs["rate"]`` is the rate used.
    """
    import pandas as pd
    y, probs = _check_probs(labels, pred_probs)
    if rate is None:
        rate = estimate_noise_rate(y, probs)
    elif isinstance(rate, (bool, np.bool_)) or not (isinstance(rate, (int, float, np.number)) and 0 <= rate <= 1):
        raise MemlocError(f"rate must be a fraction in [0, 1], not {rate!r}", argument="rate")
    values, rank = rank_label_issues(y, probs, scores=scores, by=by, seed=seed)
    n = len(y)
    df = pd.DataFrame({"is_label_issue": rank <= int(round(rate * n)), "rank": rank, "suspicion": values,
                       "label_given": y, "label_predicted": probs.argmax(axis=1),
                       "prob_given": probs[np.arange(n), y]}, index=pd.RangeIndex(n, name="id"))
    df.attrs["rate"] = float(rate)
    return df


# ----------------------------------------------------------------------------- scores
def scores_from_arrays(*, losses=None, logits=None, labels=None, correct=None, margins=None) -> dict[str, np.ndarray]:
    """Every score of :data:`memloc.analyses.scores.SCORES` that the given arrays define, by the
    same pure functions (:mod:`memloc.analyses.scores.functions`); name -> (N,) float array.

    * ``losses`` (E, N): the loss of each example's given label at each epoch (NaN = not seen) ->
      ``final_loss`` (the last row), ``confidence`` and ``variability`` (mean / std of exp(-loss));
    * ``correct`` (E, N): 1 / 0 correctness at each presentation (-1 = not presented) ->
      ``forgetting`` (1 -> 0 transitions; never correct = E);
    * ``logits`` (N, C) with ``labels`` (N,) -> ``el2n`` (||softmax(logits) - onehot(labels)||_2); a language
      model's suffix logits (N, S, V) with its suffix tokens (N, S) -> the mean over the S positions;
    * ``margins`` (E, N): given-label logit minus the largest other, per presentation -> ``aum``.
    """
    given = {k: v for k, v in (("losses", losses), ("correct", correct), ("margins", margins)) if v is not None}
    if not given and logits is None:
        raise MemlocError("give at least one of losses, correct, margins, or logits with labels", argument="losses")
    from .scores import functions as f
    n = None
    arrays = {}
    for name, values in given.items():
        arrays[name] = _check_epochs(values, name, n)
        n = arrays[name].shape[1]
    out: dict[str, np.ndarray] = {}
    if "losses" in arrays:
        loss = arrays["losses"]
        out.update(final_loss=f.final_loss(loss), confidence=f.confidence(loss), variability=f.variability(loss))
    if "correct" in arrays:
        c = arrays["correct"]
        if not np.isin(c, (-1, 0, 1)).all():
            raise MemlocError("correct must hold 1 (correct), 0 (wrong) or -1 (not presented)", argument="correct")
        out["forgetting"] = f.forgetting_events(c.astype(np.int64))
    if logits is not None:
        z = _floats(logits, "logits")
        if z.ndim not in (2, 3) or (n is not None and z.shape[0] != n) or not np.isfinite(z).all():
            raise MemlocError(f"logits has shape {z.shape}; give finite values, one row per example, shape "
                              f"({'N' if n is None else n}, C) (a language model's suffix logits: (N, S, V))",
                              argument="logits")
        if labels is None:
            raise MemlocError("el2n needs the labels of the logits' rows", argument="labels")
        if z.ndim == 3:     # a language model's: the suffix tokens (N, S) of its suffix logits
            tokens = np.asarray(labels)
            if tokens.shape != z.shape[:2]:
                raise MemlocError(f"labels has shape {tokens.shape}; give the suffix tokens of the logits, shape "
                                  f"{z.shape[:2]}", argument="labels")
            y = _check_labels(tokens.reshape(-1), num_classes=z.shape[2]).reshape(tokens.shape)
        else:
            y = _check_labels(labels, num_classes=z.shape[1])
        if len(y) != len(z):
            raise MemlocError(f"labels has {len(y)} entries; logits has {len(z)} rows", argument="labels")
        out["el2n"] = f.el2n(z, y)
    if "margins" in arrays:
        out["aum"] = f.aum(arrays["margins"])
    return out
