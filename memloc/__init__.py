"""memloc: where in a network are mislabeled (memorised) training examples stored?"""
__version__ = "0.1.0"

from .run import Recorder, Run, load  # noqa: E402,F401
