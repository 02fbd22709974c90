"""Sequence corpora by name: what a language-model run's ``dataset`` means (the image datasets are
:mod:`memloc.core.data`'s).

``tinymem:increment`` and ``tinymem:mult`` are TinyMem's arithmetic sequences
(:func:`memloc.core.sequences.tinymem`), generated from a spec such as a run stores in ``run.json``
(``{"dataset": "tinymem:mult", "n_train": 1000, "seq_len": 64, "noise": 0.1, ...}``), so a run's
:class:`memloc.core.sequences.SequenceSet` is rebuilt exactly from it.
"""
from __future__ import annotations

from .errors import MemlocError
from .sequences import TASKS, SequenceSet, tinymem

__all__ = ["SEQUENCE_CORPORA", "CORPUS_KEYS", "is_sequence_dataset", "check_corpus", "build_sequences"]

#: the built-in sequence corpora (``dataset`` names)
SEQUENCE_CORPORA = tuple(f"tinymem:{task}" for task in TASKS)
#: the keys of a corpus spec besides ``dataset`` (the generator's options; ``data_seed`` is its seed)
CORPUS_KEYS = ("n_train", "n_test", "seq_len", "prefix_len", "suffix_len", "noise", "backdoor", "duplicate",
               "data_seed")


def is_sequence_dataset(name) -> bool:
    """Does dataset name ``name`` denote a sequence corpus (``tinymem:...``), i.e. a language-model run?"""
    return isinstance(name, str) and name.split(":", 1)[0] == "tinymem"


def check_corpus(name) -> str:
    """``name`` if it is a built-in sequence corpus, else a :class:`MemlocError` naming ``dataset``."""
    name = str(name)
    if name not in SEQUENCE_CORPORA:
        what = (f"unknown tinymem task {name.split(':', 1)[1]!r}" if is_sequence_dataset(name)
                else f"unknown sequence corpus {name!r}")
        raise MemlocError(f"{what}; valid: {', '.join(SEQUENCE_CORPORA)}", argument="dataset")
    return name


def build_sequences(spec: dict) -> SequenceSet:
    """The :class:`SequenceSet` of corpus spec ``spec`` (``dataset`` and any of :data:`CORPUS_KEYS`)."""
    name = check_corpus(spec.get("dataset"))
    options = {k: spec[k] for k in CORPUS_KEYS if spec.get(k) is not None and k != "data_seed"}
    return tinymem(name.split(":", 1)[1], **options, seed=spec.get("data_seed") or 0)
