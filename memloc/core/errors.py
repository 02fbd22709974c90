"""memloc's one exception type for mistakes in what the caller passed (arguments, files, data)."""
from __future__ import annotations

__all__ = ["MemlocError"]


class MemlocError(ValueError):
    """A mistake in the caller's input. Library messages name function arguments (``batch_size``),
    never command-line flags; the commands print it as one line and exit with status 2.

    ``argument``: the argument the message starts with, if any (the commands show its flag instead).
    """

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument
