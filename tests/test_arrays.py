"""Label issues and scores from plain arrays (memloc.analyses.arrays): against cleanlab, by hand,
against the run-level estimator, and their errors."""
import subprocess
import sys

import numpy as np
import pytest

import memloc
from memloc.analyses.arrays import (estimate_joint, estimate_noise_rate, find_label_issues_in_arrays,
                                    rank_label_issues, scores_from_arrays, suspicion)
from memloc.analyses.label_issues import confident_joint_rate
from memloc.core.errors import MemlocError

#: (seed, N, class prior, planted noise rate): balanced, imbalanced (down to 4% and 10% classes), binary
SETS = [(0, 2000, [0.25] * 4, 0.1), (1, 2000, [0.6, 0.2, 0.1, 0.06, 0.04], 0.2), (2, 3000, [0.5, 0.3, 0.2], 0.3),
        (3, 1500, [0.9, 0.1], 0.15), (4, 2000, [0.1] * 10, 0.4)]


def synthetic(seed, n, prior, rate, concentration=8.0):
    """(given labels (N,), pred_probs (N, C), is_noisy (N,)): true classes drawn from ``prior``, a
    fraction ``rate`` flipped to another class uniformly, probabilities a Dirichlet peaked on the
    true class (what an out-of-sample model sees)."""
    rng = np.random.default_rng(seed)
    c = len(prior)
    true = rng.choice(c, n, p=prior)
    noisy = rng.random(n) < rate
    given = np.where(noisy, (true + rng.integers(1, c, n)) % c, true)
    alpha = np.ones((n, c))
    alpha[np.arange(n), true] = concentration
    probs = rng.gamma(alpha)
    return given, probs / probs.sum(1, keepdims=True), given != true


def _definitions_coincide(count, labels, probs) -> bool:
    """No example with 2+ classes above threshold whose argmax is below its own (cleanlab counts
    the argmax there), and no raw diagonal count below 1 (cleanlab raises it to 1)."""
    above = probs >= count.get_confident_thresholds(labels, probs) - 1e-6
    quirk = (above.sum(1) > 1) & ~above[np.arange(len(labels)), probs.argmax(1)]
    return not quirk.any() and count.compute_confident_joint(labels, probs, calibrate=False).diagonal().min() >= 1


# ----------------------------------------------------------------------------- against cleanlab
@pytest.mark.parametrize("seed, n, prior, rate", SETS, ids=[f"set{s[0]}" for s in SETS])
def test_estimate_joint_is_cleanlabs_before_rounding(seed, n, prior, rate):
    count = pytest.importorskip("cleanlab.count")
    from cleanlab.internal.util import round_preserving_row_totals
    labels, probs, noisy = synthetic(seed, n, prior, rate)
    ours, theirs = estimate_joint(labels, probs), count.estimate_joint(labels, probs)
    assert _definitions_coincide(count, labels, probs)
    # cleanlab rounds the calibrated counts to integers (row totals kept); rounded so, ours is theirs exactly
    assert np.array_equal(round_preserving_row_totals(ours * n) / n, theirs)
    assert np.abs(ours - theirs).max() < 1 / n                       # measured: 0.43 / n .. 0.65 / n
    assert np.allclose(ours.sum(1), np.bincount(labels, minlength=len(prior)) / n, rtol=0, atol=1e-12)
    assert np.allclose(ours.sum(1), theirs.sum(1), rtol=0, atol=1e-12) and ours.sum() == pytest.approx(1)
    estimate = estimate_noise_rate(labels, probs)
    assert estimate == pytest.approx(1 - np.trace(ours), abs=1e-12)
    assert abs(estimate - (1 - np.trace(theirs))) < 2 / n           # measured: 0.16 / n .. 1.04 / n
    assert abs(estimate - noisy.mean()) < 0.02                       # measured: 0.001 .. 0.012


def test_estimate_joint_where_cleanlab_counts_the_argmax():
    """A weak model (flat probabilities) puts one example above threshold in two classes while its
    argmax is below threshold: cleanlab counts it at the argmax, memloc at the more probable of the
    two. The joints differ by about one count, no longer by rounding alone."""
    count = pytest.importorskip("cleanlab.count")
    from cleanlab.internal.util import round_preserving_row_totals
    labels, probs, _ = synthetic(5, 2000, [0.4, 0.3, 0.1, 0.1, 0.05, 0.05], 0.2, concentration=3.0)
    n = len(labels)
    assert not _definitions_coincide(count, labels, probs)
    ours, theirs = estimate_joint(labels, probs), count.estimate_joint(labels, probs)
    assert not np.array_equal(round_preserving_row_totals(ours * n) / n, theirs)
    assert np.abs(ours - theirs).max() < 2 / n                       # measured: 1.47 / n
    assert abs(estimate_noise_rate(labels, probs) - (1 - np.trace(theirs))) < 2 / n   # measured: 1.3 / n


def test_estimate_joint_where_cleanlab_raises_the_diagonal():
    """A class none of whose examples is confidently itself: cleanlab raises its raw diagonal count to 1.

    labels [0, 0, 1, 1], probs [.9 .1], [.7 .3], [.9 .1], [.8 .2]: thresholds t0 = (.9 + .7) / 2 = .8,
    t1 = (.1 + .2) / 2 = .15. Example 0: only p0 >= t0 -> (0, 0); example 1: only p1 -> (0, 1);
    example 2: only p0 -> (1, 0); example 3: p0 = .8 >= t0 and p1 = .2 >= t1, argmax 0 -> (1, 0).
    Raw counts [[1, 1], [2, 0]], rows already the label counts (2, 2): joint [[.25, .25], [.5, 0]],
    rate .75. cleanlab: [[1, 1], [2, 1]] -> row 1 scaled to 2: [4/3, 2/3] -> rounded [1, 1]: all .25, rate .5.
    """
    count = pytest.importorskip("cleanlab.count")
    labels, probs = np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    assert np.array_equal(estimate_joint(labels, probs), [[0.25, 0.25], [0.5, 0.0]])
    assert np.array_equal(count.estimate_joint(labels, probs), np.full((2, 2), 0.25))
    assert estimate_noise_rate(labels, probs) == 0.75


@pytest.mark.parametrize("seed, n, prior, rate", SETS, ids=[f"set{s[0]}" for s in SETS])
def test_flags_agree_with_cleanlabs_find_label_issues(seed, n, prior, rate):
    """Measured over the sets: Jaccard 0.82-0.95; 97.8-100% of cleanlab's flags are memloc's;
    memloc precision 0.94-0.99, recall 0.93-1.0; cleanlab precision 0.98-1.0, recall 0.83-0.94.
    memloc flags more: round(rate x N) by self-confidence, where cleanlab (prune_by_noise_rate) also
    drops every example whose given label is its argmax."""
    cl_filter = pytest.importorskip("cleanlab.filter")
    labels, probs, noisy = synthetic(seed, n, prior, rate)
    df = find_label_issues_in_arrays(labels, probs)
    ours = df["is_label_issue"].to_numpy()
    theirs = cl_filter.find_label_issues(labels, probs, n_jobs=1)
    assert ours.sum() == round(estimate_noise_rate(labels, probs) * n) == round(df.attrs["rate"] * n)
    assert (ours & theirs).sum() / (ours | theirs).sum() > 0.8
    assert (ours & theirs).sum() / theirs.sum() > 0.95
    for flags in (ours, theirs):                                     # both find the planted noise
        assert (flags & noisy).sum() / flags.sum() > 0.9
    assert (ours & noisy).sum() / noisy.sum() > 0.9


# ----------------------------------------------------------------------------- by hand
def test_a_tiny_case_by_hand():
    """labels [0, 0, 1, 1], probs [.9 .1], [.6 .4], [.2 .8], [.8 .2].

    Thresholds: t0 = mean p0 over labels 0 = (.9 + .6) / 2 = .75; t1 = mean p1 over labels 1 =
    (.8 + .2) / 2 = .5. Example 0: p0 = .9 >= .75, p1 = .1 < .5 -> counted (given 0, true 0);
    example 1: .6 < .75, .4 < .5 -> not counted; example 2: .2 < .75, .8 >= .5 -> (1, 1);
    example 3: .8 >= .75, .2 < .5 -> (1, 0). Raw counts [[1, 0], [1, 1]]; row 0 scaled to its 2
    labels: [2, 0], row 1 (2 labels, 2 counted): [1, 1]; over N = 4: [[.5, 0], [.25, .25]]; rate =
    off-diagonal .25 -> round(.25 x 4) = 1 flag. Self-confidence suspicion 1 - p[given] =
    [.1, .4, .2, .8]: ranks [4, 2, 3, 1], example 3 flagged; predicted labels [0, 0, 1, 0].
    """
    labels, probs = np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.8, 0.2]])
    assert np.array_equal(estimate_joint(labels, probs), [[0.5, 0.0], [0.25, 0.25]])
    assert estimate_noise_rate(labels, probs) == 0.25
    values, rank = rank_label_issues(labels, probs)
    assert np.allclose(values, [0.1, 0.4, 0.2, 0.8]) and list(rank) == [4, 2, 3, 1]
    df = find_label_issues_in_arrays(labels, probs)
    assert list(df["is_label_issue"]) == [False, False, False, True] and list(df["rank"]) == [4, 2, 3, 1]
    assert list(df["label_predicted"]) == [0, 0, 1, 0] and list(df["label_given"]) == [0, 0, 1, 1]
    assert np.allclose(df["prob_given"], [0.9, 0.6, 0.8, 0.2]) and df.index.name == "id"
    assert find_label_issues_in_arrays(labels, probs, rate=0.5)["is_label_issue"].sum() == 2
    assert not find_label_issues_in_arrays(labels, probs, rate=0)["is_label_issue"].any()
    pytest.importorskip("cleanlab.count")
    import cleanlab.count
    assert np.array_equal(cleanlab.count.estimate_joint(labels, probs), [[0.5, 0.0], [0.25, 0.25]])


# ----------------------------------------------------------------------------- the old estimator
def _reference_rate(probs, labels) -> float:
    """The confident-joint rate example by example (what ``confident_joint_rate`` computed)."""
    n, c = probs.shape
    thresholds = [probs[labels == j, j].mean() - 1e-6 if (labels == j).any() else np.inf for j in range(c)]
    joint = np.zeros((c, c))
    for p, i in zip(probs, labels):
        confident = [j for j in range(c) if p[j] >= thresholds[j]]
        if confident:
            joint[i, max(confident, key=lambda j: (p[j], -j))] += 1   # the first of equal maxima, as argmax
    for i in range(c):
        if joint[i].sum():
            joint[i] = joint[i] / joint[i].sum() * (labels == i).sum()
    return float(1.0 - np.trace(joint) / n)


def test_estimate_noise_rate_is_the_old_confident_joint_rate():
    """Bit for bit, on random probabilities: flat, peaked, with exact ties, float32 (the literal old
    function also agreed on 3000 such arrays when this module was written)."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        n, c = int(rng.integers(2, 200)), int(rng.integers(2, 9))
        labels = rng.integers(0, c, n)
        if trial % 3 == 0:
            probs = rng.dirichlet(np.full(c, rng.uniform(0.1, 3.0)), n)
        elif trial % 3 == 1:                                       # many exact ties
            probs = rng.integers(0, 4, (n, c)) + 1e-9
            probs = probs / probs.sum(1, keepdims=True)
        else:
            probs = rng.dirichlet(np.ones(c), n).astype(np.float32)
        rate = estimate_noise_rate(labels, probs)
        assert rate == confident_joint_rate(probs, labels) == _reference_rate(np.asarray(probs, np.float64), labels)


# ----------------------------------------------------------------------------- ranking from scores
def test_rank_label_issues_from_scores():
    rng = np.random.default_rng(1)
    n = 50
    table = {"confidence": rng.random(n), "el2n": rng.random(n), "aum": rng.normal(size=n),
             "forgetting": rng.integers(0, 3, n)}
    labels = rng.integers(0, 3, n)
    values, rank = rank_label_issues(labels, scores=table)
    assert np.array_equal(values, suspicion(table, "combined"))
    assert sorted(rank) == list(range(1, n + 1)) and np.all(np.diff(values[np.argsort(rank)]) <= 0)
    values, rank = rank_label_issues(labels, scores=table, by="aum")
    assert np.array_equal(values, -table["aum"]) and rank[np.argmin(table["aum"])] == 1
    _, tied = rank_label_issues(labels, scores=table, by="forgetting", seed=3)
    assert sorted(tied) == list(range(1, n + 1))
    assert np.array_equal(tied, rank_label_issues(labels, scores=table, by="forgetting", seed=3)[1])
    probs = rng.dirichlet(np.ones(3), n)
    df = find_label_issues_in_arrays(labels, probs, scores=table, rate=0.2)
    flagged = df["is_label_issue"].to_numpy()
    assert flagged.sum() == 10 and df["suspicion"][flagged].min() >= df["suspicion"][~flagged].max()


# ----------------------------------------------------------------------------- scores
def test_scores_from_arrays_match_the_formulas():
    losses = np.array([[0.1, 2.0, np.nan], [0.3, 1.0, 0.5], [0.2, 0.5, 0.7]])          # (E=3, N=3)
    correct = np.array([[1, 0, 1], [0, 0, -1], [1, 0, 0], [0, 0, 1]])                 # (E=4, N=3)
    margins = np.array([[1.0, -2.0, 0.5], [3.0, -1.0, np.nan]])
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    labels = np.array([0, 2, 0])
    out = scores_from_arrays(losses=losses, correct=correct, margins=margins, logits=logits, labels=labels)
    assert set(out) == {"final_loss", "confidence", "variability", "forgetting", "el2n", "aum"}
    p = np.exp(-losses)
    assert np.array_equal(out["final_loss"], [0.2, 0.5, 0.7])
    assert np.allclose(out["confidence"], [p[:, 0].mean(), p[:, 1].mean(), p[1:, 2].mean()])
    assert np.allclose(out["variability"], [p[:, 0].std(), p[:, 1].std(), p[1:, 2].std()])
    # column 0: 1 0 1 0, two 1 -> 0; column 1: never correct -> E = 4; column 2: 1 (skip) 0 1, one
    assert np.array_equal(out["forgetting"], [2, 4, 1])
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(out["el2n"], np.linalg.norm(soft - np.eye(3)[labels], axis=1))
    assert np.allclose(out["aum"], [2.0, -1.5, 0.5])
    assert set(scores_from_arrays(margins=margins)) == {"aum"}
    assert set(scores_from_arrays(logits=logits, labels=labels)) == {"el2n"}


# ----------------------------------------------------------------------------- errors, face, weight
def _error(argument, func, *args, **kwargs):
    with pytest.raises(MemlocError) as e:
        func(*args, **kwargs)
    message = str(e.value)
    assert e.value.argument == argument and argument in message and len(message.splitlines()) == 1, message


def test_errors_name_the_argument():
    labels, probs = np.array([0, 1, 1]), np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    for func in (estimate_joint, estimate_noise_rate, find_label_issues_in_arrays, rank_label_issues):
        _error("labels", func, labels[:, None], probs)
        _error("labels", func, np.array([0, 2, 1]), probs)                 # out of range
        _error("labels", func, np.array([0, -1, 1]), probs)
        _error("labels", func, np.array([0.0, 0.5, 1.0]), probs)           # not integers
        _error("pred_probs", func, labels, probs[:2])                      # one row short
        _error("pred_probs", func, labels, probs[:, :1])                   # one class
        _error("pred_probs", func, labels, np.where(probs == 0.2, np.nan, probs))
        _error("pred_probs", func, labels, probs * 2)                      # not normalised
        _error("pred_probs", func, labels, np.array([[1.2, -0.2], [0.2, 0.8], [0.5, 0.5]]))
    for rate in (1.5, -0.1, float("nan"), "0.1"):
        _error("rate", find_label_issues_in_arrays, labels, probs, rate=rate)
    _error("by", rank_label_issues, labels, probs, by="bogus")
    _error("scores", rank_label_issues, labels, probs, by="el2n")
    _error("scores", rank_label_issues, labels, scores={"confidence": np.zeros(3)})      # combined: 2 missing
    _error("scores", rank_label_issues, labels, scores={"aum": np.zeros(2)}, by="aum")
    _error("pred_probs", rank_label_issues, labels)
    _error("pred_probs", rank_label_issues, labels, by="self_confidence", scores={"aum": np.zeros(3)})
    _error("losses", scores_from_arrays)
    _error("losses", scores_from_arrays, losses=np.zeros(3))
    _error("margins", scores_from_arrays, losses=np.zeros((2, 3)), margins=np.zeros((2, 4)))
    _error("correct", scores_from_arrays, correct=np.array([[1, 2, 0]]))
    _error("labels", scores_from_arrays, logits=np.zeros((3, 2)))
    _error("labels", scores_from_arrays, logits=np.zeros((3, 2)), labels=np.array([0, 1]))
    _error("logits", scores_from_arrays, losses=np.zeros((2, 3)), logits=np.zeros((4, 2)), labels=np.zeros(4, int))


def test_the_face_and_a_light_import():
    import memloc.analyses.arrays as arrays
    for name in ("estimate_joint", "estimate_noise_rate", "rank_label_issues", "find_label_issues_in_arrays",
                 "scores_from_arrays"):
        assert getattr(memloc, name) is getattr(arrays, name) and name in memloc.__all__
    # the estimates and the ranking from pred_probs alone never load torch
    code = ("import sys, numpy as np, memloc; y = np.array([0, 0, 1, 1]); "
            "p = np.array([[.9, .1], [.6, .4], [.2, .8], [.8, .2]]); memloc.estimate_joint(y, p); "
            "memloc.find_label_issues_in_arrays(y, p); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
