"""Sequence corpora by name: what a language-model run's ``dataset`` means (the image datasets are
:mod:`memloc.core.data`'s).

- ``tinymem:increment`` and ``tinymem:mult``: TinyMem's arithmetic sequences
  (:func:`memloc.core.sequences.tinymem`);
- ``canaries:stdlib``: Carlini et al.'s secrets planted ``repeats`` times into byte-level chunks of
  the standard library's source (:func:`memloc.core.canaries.canaries`);
- ``textfile:PATH``: a user's UTF-8 text file in byte-level chunks, with sequences planted from an
  ``inject`` file (:func:`memloc.core.textfile.textfile`).

A run stores its corpus spec in ``run.json`` (``{"dataset": "tinymem:mult", "n_train": 1000, "seq_len":
64, "noise": 0.1, ...}``; :func:`corpus_spec` makes it from a run's config), so that its
:class:`memloc.core.sequences.SequenceSet` is rebuilt exactly from it (:func:`build_sequences`). A
text file's spec holds its absolute path and sha256 (and the inject file's): a run whose file
changed is refused rather than rebuilt on other text.
"""
from __future__ import annotations

import numbers
from pathlib import Path

from .errors import MemlocError
from .sequences import TASKS, SequenceSet, tinymem

__all__ = ["SEQUENCE_CORPORA", "FAMILIES", "CORPUS_KEYS", "FAMILY_KEYS", "is_sequence_dataset", "check_corpus",
           "corpus_spec", "build_sequences", "parse_repeats"]

#: the built-in sequence corpora (``dataset`` names; ``textfile:PATH`` besides)
SEQUENCE_CORPORA = (*(f"tinymem:{task}" for task in TASKS), "canaries:stdlib")
FAMILIES = ("tinymem", "canaries", "textfile")
#: the keys of a tinymem corpus spec besides ``dataset`` (the generator's options; ``data_seed`` is its seed)
CORPUS_KEYS = ("n_train", "n_test", "seq_len", "prefix_len", "suffix_len", "noise", "backdoor", "duplicate",
               "data_seed")
#: each family's corpus options (a run's config keys); the others are refused for it
FAMILY_KEYS = {"tinymem": CORPUS_KEYS, "canaries": ("n_train", "n_test", "seq_len", "repeats", "n_digits", "data_seed"),
               "textfile": ("n_train", "n_test", "seq_len", "prefix_len", "suffix_len", "inject", "data_seed")}


def is_sequence_dataset(name) -> bool:
    """Does dataset name ``name`` denote a sequence corpus (``tinymem:...``, ``canaries:...``,
    ``textfile:...``), i.e. a language-model run?"""
    return isinstance(name, str) and name.split(":", 1)[0] in FAMILIES


def check_corpus(name) -> str:
    """``name`` if it is a sequence corpus, else a :class:`MemlocError` naming ``dataset``."""
    name = str(name)
    family, _, rest = name.partition(":")
    if name in SEQUENCE_CORPORA or (family == "textfile" and rest):
        return name
    what = {"tinymem": f"unknown tinymem task {rest!r}", "canaries": f"unknown canary corpus {rest!r}",
            "textfile": "textfile: needs a file's path"}.get(family, f"unknown sequence corpus {name!r}")
    raise MemlocError(f"{what}; valid: {', '.join(SEQUENCE_CORPORA)}, textfile:PATH", argument="dataset")


def parse_repeats(value) -> list[int]:
    """``"1,4,16,64"`` (or a list / an int) as a list of insertion counts, each >= 1."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, numbers.Integral) else list(value)
    try:
        counts = [int(str(v).strip()) for v in items]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise MemlocError(f"repeats {value!r}: give insertion counts >= 1, comma-separated (e.g. 1,4,16,64)",
                          argument="repeats")
    return counts


def corpus_spec(cfg: dict) -> dict:
    """The corpus spec of a run's (resolved) config: ``dataset``, its family's options, and for a text
    file the absolute paths and sha256 of the file and of the inject file."""
    name = check_corpus(cfg["dataset"])
    family = name.split(":", 1)[0]
    spec = {"dataset": name, **{k: cfg.get(k) for k in FAMILY_KEYS[family]}}
    if family == "textfile":
        from .textfile import read_text, sha256
        path = Path(name.split(":", 1)[1]).expanduser().resolve()
        spec.update(path=str(path), sha256=sha256(read_text(path)))
        if spec["inject"] is not None:
            inject = Path(spec["inject"]).expanduser().resolve()
            spec.update(inject=str(inject),
                        inject_sha256=sha256(read_text(inject, argument="inject", what="inject file")))
    return spec


def build_sequences(spec: dict) -> SequenceSet:
    """The :class:`SequenceSet` of corpus spec ``spec`` (:func:`corpus_spec`; a tinymem spec may hold
    any of :data:`CORPUS_KEYS`)."""
    name = check_corpus(spec.get("dataset"))
    family, rest = name.split(":", 1)
    options = {k: spec[k] for k in FAMILY_KEYS[family] if spec.get(k) is not None and k != "data_seed"}
    seed = spec.get("data_seed") or 0
    if family == "canaries":
        from .canaries import canaries
        if "repeats" in options:
            options["repeats"] = parse_repeats(options["repeats"])
        return canaries(**options, seed=seed)
    if family == "textfile":
        from .textfile import textfile
        return textfile(spec.get("path", rest), **options, seed=seed, sha=spec.get("sha256"),
                        inject_sha=spec.get("inject_sha256"))
    return tinymem(rest, **options, seed=seed)
