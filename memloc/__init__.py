"""memloc: where in a network are mislabeled (memorised) training examples stored?"""
__version__ = "0.1.0"

from .run import Recorder, Run, load  # noqa: E402,F401

_LAZY = {"ExampleTiedDropout", "insert_example_tied_dropout", "set_mode", "example_ids"}


def __getattr__(name):
    # imported on first use, so that `python -m memloc.dropout` does not import itself twice
    if name in _LAZY:
        from . import dropout
        return getattr(dropout, name)
    raise AttributeError(f"module 'memloc' has no attribute {name!r}")
