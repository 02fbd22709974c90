"""Do the scores agree on which examples are suspicious, and does a score agree with itself across runs?

``memloc.score_agreement([scores_seed0, scores_seed1, ...])`` takes one or more ``"scores"`` results
(:func:`memloc.scores`, one per run / seed of the same training data: the same ``example``
coordinate) and returns the ``"agreement"`` result:

* ``between`` (score, score_b): Spearman rank correlation between two scores, one value per run,
  averaged over the runs;
* ``across_runs`` (score): the Spearman correlation of a score between two runs, averaged over
  every pair of runs (NaN with one run): how reproducible the score's ranking is across seeds;
* ``pairs`` (score): run pairs in that mean (those with a defined correlation).

Scores are compared raw, as stored: Spearman's correlation depends on ranks only, so any increasing
transform of a score changes nothing. Each score is multiplied by its ``direction`` attribute
(+1: higher = more likely mislabeled, -1: lower is) first, so a **positive** correlation means the
two scores agree on which examples are suspicious (confidence, direction -1, and final loss, +1,
correlate positively when they flag the same examples). Each correlation uses the examples where
both values are finite (neuron_count is defined on the flip sample only); fewer than 3 such
examples, or a constant score there, give NaN.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import xarray as xr
from scipy import stats

from ..core.deprecation import renamed
from ..core.errors import MemlocError
from ..core.results import Result, load_result
from ..core.runtime import split_list
from ..core.schemas import Schema, Var
from ..core.registry import Analysis

__all__ = ["spearman", "score_agreement"]


def spearman(a, b) -> float:
    """Spearman rank correlation over the positions where both are finite (NaN: < 3 or constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(stats.spearmanr(a, b)[0])


def _as_scores(item, i: int) -> Result:
    if isinstance(item, (str, Path)):
        item = load_result(item, "scores")
    if not isinstance(item, Result) or item.name != "scores":
        raise MemlocError(f"source[{i}] is not a 'scores' result (memloc.scores), got "
                          f"{getattr(item, 'name', type(item).__name__)!r}", argument="source")
    return item


def _direction(res: Result, name: str) -> int:
    from .scores import SCORES
    d = res[name].attrs.get("direction", SCORES[name].direction if name in SCORES else None)
    if d is None or int(d) not in (1, -1):
        raise MemlocError(f"score {name!r} has no direction attribute (+1 or -1)", argument="source")
    return int(d)


@renamed(results="source", names="methods")
def score_agreement(source, *, methods=None) -> Result:
    """Spearman agreement between scores (``between``) and of each score across runs (``across_runs``).

    ``source``: a list of ``"scores"`` results (or paths of saved ones; a single result is one
    run), all over the same examples. ``methods``: the scores to compare (list or comma-separated;
    default: every score present in all results). Returns the ``"agreement"`` result.
    """
    if isinstance(source, (Result, str, Path)):
        source = [source]
    if not isinstance(source, (list, tuple)):
        raise MemlocError(f"source must be a 'scores' result or a list of them, got {type(source).__name__}",
                          argument="source")
    results = [_as_scores(r, i) for i, r in enumerate(source)]
    if not results:
        raise MemlocError("source is empty: give at least one scores result", argument="source")
    example = results[0]["example"].values
    for i, r in enumerate(results[1:], 1):
        if not np.array_equal(r["example"].values, example):
            raise MemlocError(f"source[{i}] is over other examples than source[0] ({r.sizes['example']} vs "
                              f"{len(example)}, or another order): compare runs of the same training data",
                              argument="source")
    common = [n for n in results[0].data_vars if all(n in r.data_vars for r in results[1:])]
    if methods is None:
        chosen = common
    else:
        chosen = list(dict.fromkeys(split_list(methods)))
        bad = [n for n in chosen if n not in common]
        if bad:
            raise MemlocError(f"score {', '.join(map(repr, bad))} is not in every result; available: "
                              f"{', '.join(common) or 'none'}", argument="methods")
    if not chosen:
        raise MemlocError("no score common to every result", argument="methods")
    directions = {n: _direction(results[0], n) for n in chosen}
    for i, r in enumerate(results[1:], 1):
        for n in chosen:
            if _direction(r, n) != directions[n]:
                raise MemlocError(f"score {n!r} has direction {_direction(r, n)} in source[{i}] but "
                                  f"{directions[n]} in source[0]", argument="source")
    signed = [{n: directions[n] * r[n].values.astype(np.float64) for n in chosen} for r in results]

    s = len(chosen)
    between = np.full((len(results), s, s), np.nan)
    for k, vals in enumerate(signed):
        for i, j in itertools.combinations_with_replacement(range(s), 2):
            between[k, i, j] = between[k, j, i] = spearman(vals[chosen[i]], vals[chosen[j]])
    across = np.full(s, np.nan)
    pairs = np.zeros(s, dtype=np.int64)
    for i, n in enumerate(chosen):
        rho = [spearman(a[n], b[n]) for a, b in itertools.combinations(signed, 2)]
        rho = [r for r in rho if np.isfinite(r)]
        pairs[i] = len(rho)
        if rho:
            across[i] = float(np.mean(rho))
    ds = xr.Dataset({"between": (("score", "score_b"), _nanmean(between)),
                     "across_runs": ("score", across), "pairs": ("score", pairs)},
                    coords={"score": chosen, "score_b": chosen})
    config = {"scores": chosen, "runs": len(results), "directions": directions,
              "examples": int(len(example))}
    return Result("agreement", ds, config=config)


def _nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where every entry is NaN (without numpy's warning)."""
    ok = np.isfinite(x)
    n = ok.sum(0)
    return np.where(n > 0, np.where(ok, x, 0).sum(0) / np.maximum(n, 1), np.nan)


# The declaration: command line, report section and result schema (memloc.core.registry).

ANALYSIS = Analysis(
    name="agreement", order=65, compute=score_agreement,
    schema=Schema("agreement", "Spearman rank agreement between scores and across runs (memloc.score_agreement)",
                  {"score": Var(("score",), "score name"), "score_b": Var(("score_b",), "score name (the same list)")},
                  {"between": Var(("score", "score_b"), "Spearman correlation of direction x score between the two "
                                  "scores (examples finite in both), mean over runs; > 0: they flag the same examples"),
                   "across_runs": Var(("score",), "Spearman correlation of the score between two runs, mean over "
                                      "run pairs (NaN with one run)"),
                   "pairs": Var(("score",), "run pairs in that mean (those with a defined correlation)")}),
)
