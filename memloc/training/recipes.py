"""Training recipes: named sets of :func:`memloc.train` options; explicit options always win.

``paper``: the CIFAR-10 / SVHN ResNet-9 recipe of Maini et al. (ICML 2023), read from the authors'
code (github.com/pratyushmaini/localizing-memorization):

==============  ==========================  ===============================================================
option          value                       source in the official code
==============  ==========================  ===============================================================
dataset         cifar10                     the paper's main dataset (``--dataset1``; svhn, mnist also used)
model, width    resnet9, 64                 ``models.py`` ``ResNet9`` (first conv 64 channels)
noise           0.1, symmetric              ``corrupt_labels`` in ``dataloader.py`` (exactly int(0.1 N) labels)
optimizer       sgd, momentum 0.9           ``train.py`` / ``experiments/neuron_flipping/train.py``:
                                            ``SGD(lr=lr1, momentum=0.9, weight_decay=5e-4)``
weight_decay    5e-4                        the same, and ``params.py --wd``
lr              0.1 (peak)                  ``params.py --lr1``
batch_size      512                         ``params.py --batch_size``
epochs          100                         ``params.py --num_epochs``; ``experiments/rewinding.py`` and
                                            ``retraining.py``: 100 epochs for augmented runs, 50 without
schedule        onecycle, warmup 10/epochs  ``utils.get_scheduler_epochs("triangle")``: linear 0 -> peak at
                (at most 0.5)               epoch 10, linear -> 0 at the end (``params.py --sched``)
augment         crop+flip; svhn and the     ``dataloader.py`` ``tvs_train``: RandomCrop(32, padding=4) +
                digit datasets: crop        RandomHorizontalFlip, for mnist / svhn crop (+ rotation) only
augment_pad     4                           ``padding=4``
==============  ==========================  ===============================================================

Where memloc differs from the official code: SGD is Nesterov (the official is plain momentum); noise
draws the new label uniformly from the other classes (the official adds 1..C-2 mod C, never y - 1);
padding is zero in memloc's standardised input space, i.e. the channel mean (the official pads black
before normalising to [-1, 1]); no 10-degree rotation for the digit datasets, no AutoAugment (the
official ``--augmentation 1`` path adds CIFAR-10 AutoAugment and flips every dataset, SVHN included;
its default ``--augmentation 0`` trains without augmentation: give ``augment="none"``); no mixed
precision; the official ``train.py`` hard-codes a warm-up cosine schedule (10% warm-up) and its run
lists use lr 0.01 with it (``schedule="cosine"`` is memloc's nearest, without warm-up); memloc's
``resnet9`` is the DAWNBench layout (widths w-2w-4w-8w, three conv-pool blocks, logits x 0.125), the
official ``ResNet9`` a variant (64-128-256-128: a 5x5 stride-2 conv, one max-pool, logits x 0.2).
"""
from __future__ import annotations

from ..core.errors import MemlocError
from ..core.runtime import in_range

__all__ = ["RECIPES", "recipe_options"]

#: datasets of digits: no horizontal flips (a mirrored digit is not a digit)
_NO_FLIP = ("svhn", "mnist", "mnist5k", "digits")


def _paper(given: dict) -> dict:
    epochs = given.get("epochs", 100)
    ok = in_range(epochs, 1)
    options = dict(dataset="cifar10", model="resnet9", noise_kind="symmetric", optimizer="sgd", lr=0.1,
                   momentum=0.9, weight_decay=5e-4, batch_size=512, epochs=100, schedule="onecycle",
                   warmup=min(10 / epochs, 0.5) if ok else 0.1, augment_pad=4,
                   augment="crop" if given.get("dataset", "cifar10") in _NO_FLIP else "crop+flip")
    if given.get("labels") is None:      # given labels from a file exclude synthetic noise
        options["noise"] = 0.1
    if given.get("model", "resnet9") == "resnet9":
        options["width"] = 64
    return options


#: recipe name -> function of the explicitly given options returning the options it sets
RECIPES = {"paper": _paper}


def recipe_options(name: str, given: dict) -> dict:
    """The options recipe ``name`` sets, for the explicitly ``given`` options (which are returned
    unchanged: explicit options win)."""
    if not isinstance(name, str) or name not in RECIPES:
        raise MemlocError(f"recipe {name!r} is unknown; valid: {', '.join(RECIPES)}", argument="recipe")
    return {**RECIPES[name](given), **given}
