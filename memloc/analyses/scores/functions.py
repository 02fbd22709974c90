"""The per-example scores as pure functions: arrays in, arrays out (see :mod:`memloc.scores`)."""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["final_loss", "confidence", "variability", "forgetting_events", "el2n", "aum", "neuron_count"]


def final_loss(loss: np.ndarray) -> np.ndarray:
    """Loss at the last epoch. ``loss``: (epoch, N) epoch-end losses -> (N,)."""
    return np.asarray(loss, dtype=np.float64)[-1]


def _probabilities(loss: np.ndarray) -> np.ndarray:
    return np.exp(-np.asarray(loss, dtype=np.float64))


def confidence(loss: np.ndarray) -> np.ndarray:
    """Cartography confidence: mean over epochs of p = exp(-loss). (epoch, N) -> (N,); NaN = not seen."""
    with _quiet_nan():
        return np.nanmean(_probabilities(loss), axis=0)


def variability(loss: np.ndarray) -> np.ndarray:
    """Cartography variability: population std over epochs of p = exp(-loss). (epoch, N) -> (N,)."""
    with _quiet_nan():
        return np.nanstd(_probabilities(loss), axis=0)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Toneva forgetting events. ``correct``: (presentation, N) of 1 / 0 (-1 = not presented).

    Returns (N,) float: the number of 1 -> 0 transitions between consecutive presentations
    (skipping -1 entries); an example never correct at any presentation gets the number of rows
    (strictly more than any learned example can have), one never presented gets NaN.
    """
    c = np.asarray(correct)
    seen = c >= 0
    out = ((c[:-1] == 1) & (c[1:] == 0)).sum(axis=0).astype(np.float64)
    for j in np.flatnonzero(~seen.all(axis=0)):  # columns with gaps: compare presented rows only
        col = c[seen[:, j], j]
        out[j] = float(((col[:-1] == 1) & (col[1:] == 0)).sum()) if len(col) else np.nan
    never = ~(c == 1).any(axis=0) & seen.any(axis=0)
    out[never] = c.shape[0]
    return out


def el2n(logits, labels) -> np.ndarray:
    """EL2N: ||softmax(logits) - onehot(labels)||_2, in float64. logits (N, C), labels (N,) -> (N,); a
    language model's suffix logits (N, S, V) and suffix tokens (N, S) -> (N,), the mean over the S
    positions (arrays or tensors)."""
    z = (logits if torch.is_tensor(logits) else torch.as_tensor(np.asarray(logits))).to(torch.float64)
    y = (labels if torch.is_tensor(labels) else torch.as_tensor(np.asarray(labels))).to(z.device, torch.long)
    err = z.softmax(-1) - F.one_hot(y, z.shape[-1]).to(z.dtype)
    norms = err.norm(dim=-1)
    return (norms.mean(-1) if norms.ndim == 2 else norms).cpu().numpy()


def aum(margin: np.ndarray) -> np.ndarray:
    """Area under the margin: mean over presentations of the margin. (presentation, N) -> (N,)."""
    with _quiet_nan():
        return np.nanmean(np.asarray(margin, dtype=np.float64), axis=0)


def neuron_count(index, status, n_units, flipped, *, num_examples: int, max_units: int) -> np.ndarray:
    """Neuron-count score from a flip search (schema of ``results/flip.h5``).

    ``index`` (K,) example ids, ``status`` (K,) 0 = searched, ``n_units`` / ``flipped`` (K, R).
    Returns (num_examples,): mean over repeats of ``n_units``, counting a search that did not flip
    as ``max_units + 1``; NaN for examples not searched or with status != 0.
    """
    index, status = np.asarray(index, dtype=np.int64), np.asarray(status)
    counts = np.where(np.asarray(flipped, dtype=bool), np.asarray(n_units, dtype=np.float64), max_units + 1.0)
    out = np.full(num_examples, np.nan)
    ok = status == 0
    out[index[ok]] = counts[ok].mean(axis=1)
    return out


@contextlib.contextmanager
def _quiet_nan():
    """Silence numpy's 'mean of empty slice' warnings (all-NaN columns give NaN, as intended)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
