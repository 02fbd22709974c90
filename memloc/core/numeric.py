"""Numbers given by a caller: ranges described, numbers recognised (numpy's and 0-d tensors' too, bools
never), checked and made Python numbers. Nothing heavy is imported (:mod:`memloc.analyses.arrays` runs
without torch)."""
from __future__ import annotations

import math
import numbers

from .errors import MemlocError

__all__ = ["describe_range", "as_number", "in_range", "check_range"]


def describe_range(low=None, high=None, *, integer: bool = False, low_open: bool = False,
                   high_open: bool = False) -> str:
    """``an integer >= 1``, ``a finite number in (0, 1]``, ..."""
    what = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{what} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{what} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{what} {'<' if high_open else '<='} {high}"
    return what


def as_number(value):
    """``value`` as a Python int (any ``numbers.Integral``: numpy's integers, or a 0-d integer array or tensor)
    or float (any other real number), or None when it is not a number: bools are not numbers here."""
    if isinstance(value, bool) or "bool" in type(value).__name__ or "bool" in str(getattr(value, "dtype", "")):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):      # a 0-d numpy array or torch tensor
        item = value.item()
        return item if isinstance(item, (int, float)) and not isinstance(item, bool) else None
    return None


def in_range(value, low=None, high=None, *, integer: bool = False, low_open: bool = False,
             high_open: bool = False) -> bool:
    value = as_number(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return False
    if integer and isinstance(value, float) and not value.is_integer():
        return False
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or (value <= high and not (high_open and value == high))


def check_range(name: str, value, *, low=None, high=None, integer: bool = False, low_open: bool = False,
                high_open: bool = False):
    """``value`` as a Python number (an int where ``integer``: numpy's integers and 0-d integer tensors are
    integers, ``2.0`` is 2; a float stays a float, an int an int); :class:`MemlocError` naming ``name``
    unless it is a finite number in the range (bools are not numbers)."""
    if not in_range(value, low, high, integer=integer, low_open=low_open, high_open=high_open):
        rng = describe_range(low, high, integer=integer, low_open=low_open, high_open=high_open)
        raise MemlocError(f"{name} must be {rng}, got {value!r}", argument=name)
    value = as_number(value)
    return int(value) if integer else value
