"""Greedy gradient-guided unit zeroing: how many units must be zeroed to flip one example?

``memloc.flip(run_or_model, data=None, *, examples="noisy:100,clean:100", max_units=100, repeats=1)``
(command: ``python -m memloc flip RUN --examples noisy:100,clean:100``).

For a target training example ``x`` with given label ``y`` (which the model predicts), repeat:

1. under the example's current unit mask ``m`` (1 = kept, 0 = zeroed), compute the objective
   ``O(m) = mean_b loss(x_b, y_b) - loss(x, y)`` over a reference batch ``b`` of training
   examples (clean ones by default, ``ref_pool``; the paper's "target weight -B inside a batch mean": gradient *ascent* on the target's
   loss while keeping the reference loss low);
2. if the predicted class of ``x`` is no longer ``y``: stop, the example flipped after ``len(zeroed)``
   units; if ``max_units`` units are already zeroed: stop, "not flipped";
3. score every kept unit ``j`` by the first-order *decrease* of ``O`` when it is zeroed: zeroing
   changes ``m_j`` by ``-m_j``, so ``O`` changes by about ``-m_j * dO/dm_j``, and the score is
   ``m_j * dO/dm_j`` = activation x gradient of ``O`` summed over spatial positions (what
   :func:`memloc.core.units.unit_masks` leaves in ``mask.grad``). A high score means zeroing the unit
   raises the target's loss and/or lowers the reference loss. Zero the unit with the highest
   score (already zeroed units are never picked; ties go to the lowest global unit id) and go to 1.

Options: ``noise_samples=n`` replaces the target by ``n`` Gaussian-noised copies whose logits
are averaged (noise norm = ``noise_ratio`` x input norm, redrawn every step from a seed of
(seed, example id, repeat, step)); ``repeats=R`` runs the search R times with different
reference batches (drawn once per repeat, seeded; the target itself is left out of its own
reference mean).

Many searches run at once (:class:`FlipSearch`): each example of a group has its own mask row; one
forward/backward per step evaluates every example's noisy copies under its mask, and the
reference batch under each example's mask. The reference term depends only on (repeat, set of
zeroed units), so it is memoised: searches that reach the same mask share one evaluation (on the
MNIST-5k lenet run, 743 steps of 199 searches needed 75 reference evaluations). The network up
to the first unit layer is computed once per reference batch. The stopping test is a forward of
the targets alone, so the last step of a search costs no reference evaluation. Finished
searches leave the group and queued ones take their place. With ``dtype="float64"`` the unit sequences do not depend on the
group size (the tests check them against a plain one-example-at-a-time implementation).

Returns the ``"flip"`` result (:mod:`memloc.core.schemas`): per example ``is_noisy, label, status,
neuron_count`` (status 1 = misclassified, not searched), per (example, repeat) ``n_units, flipped,
layer_hist, collateral``, the ordered unit ids as ``unit_ids`` / ``unit_offsets`` (flat + offsets).
The search is resumable: finished searches are saved in atomically written part files
(``RUN/results/flip.partial/``); rerunning with the same settings continues where a killed run
stopped, and the parts are deleted once the result is saved.
"""
from .driver import DTYPES, REF_POOLS, flip
from .search import FlipSearch, FlipTrace, noise_seed, noisy_copies
from .select import EXAMPLE_POOLS, reference_batches, select_examples
from .store import layer_histogram

__all__ = ["flip", "select_examples", "reference_batches", "noise_seed", "noisy_copies", "FlipSearch",
           "FlipTrace", "layer_histogram", "DTYPES", "REF_POOLS", "EXAMPLE_POOLS"]
