"""Renamed keyword arguments: the old spelling keeps working, with a DeprecationWarning once.

``@renamed(resume_dir="resume")`` above a function (and above ``@stored``) accepts
``resume_dir=...`` as ``resume=...``, warns once per function and old name, and refuses both
spellings at once. ``inspect.signature`` shows the new names only.
"""
from __future__ import annotations

import functools
import inspect
import warnings

__all__ = ["renamed"]

_warned: set[tuple[str, str]] = set()


def renamed(**old_to_new: str):
    """Decorator: keyword ``old`` of the decorated function is now called ``new`` (``old="new"``)."""
    def deco(fn):
        sig = inspect.signature(fn)
        missing = [new for new in old_to_new.values() if new not in sig.parameters]
        if missing:
            raise TypeError(f"renamed: {fn.__qualname__} has no argument {missing[0]!r}")
        where = f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old in [old for old in old_to_new if old in kwargs]:     # in declaration order
                new = old_to_new[old]
                if new in kwargs:
                    raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; {old} is the old name of {new}")
                kwargs[new] = kwargs.pop(old)
                if (where, old) not in _warned:
                    _warned.add((where, old))
                    warnings.warn(f"{fn.__name__}(): {old}= is deprecated, use {new}=", DeprecationWarning,
                                  stacklevel=2)
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig
        return wrapper
    return deco
