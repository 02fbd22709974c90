"""memloc's one exception type for mistakes in what the caller passed (arguments, files, data)."""
from __future__ import annotations

from typing import Callable

__all__ = ["MemlocError"]


def python_spelling(name: str, value) -> str:
    """How the library names an option in a message: ``overwrite=True``, ``data_root=DIR``."""
    return f"{name}={value!r}" if isinstance(value, str) and not value.isupper() else f"{name}={value}"


class MemlocError(ValueError):
    """A mistake in the caller's input. Library messages name function arguments (``batch_size``),
    never command-line flags; the commands print it as one line and exit with status 2.

    ``argument``: the argument the message starts with, if any (the commands show its flag instead).
    ``options``: ``{name: value}`` of the options the message advises, each written ``{name}`` in
    ``message``: ``str(error)`` spells them as the library does (``overwrite=True``, ``data_root=DIR``),
    :meth:`render` as a caller's front door does (a command: ``--overwrite``, ``--data-root DIR``).
    """

    def __init__(self, message: str, *, argument: str | None = None, options: dict | None = None):
        self.template, self.options, self.argument = message, dict(options or {}), argument
        super().__init__(self.render())

    def render(self, spell: Callable[[str, object], str] = python_spelling) -> str:
        """The message with each ``{name}`` of :attr:`options` written ``spell(name, value)``."""
        message = self.template
        for name, value in self.options.items():
            message = message.replace("{" + name + "}", spell(name, value))
        return message

    def __reduce__(self):       # pickles whole (errors cross process groups, :mod:`memloc.scale`)
        return _rebuild, (self.template, self.argument, self.options, type(self))


def _rebuild(template, argument, options, cls=None):
    return (cls or MemlocError)(template, argument=argument, options=options)
