"""Exceptions shared by the layers (pure Python: ``quant/`` and ``calib/`` import it)."""
from __future__ import annotations

__all__ = ['UnknownFieldError']


class UnknownFieldError(KeyError, ValueError):
    """A config names a field, option or group that does not exist.

    The message names it and lists the allowed ones. It is a ``KeyError`` (a name that is
    not there, as the registries raise) and a ``ValueError`` (bad input), so callers may
    catch either.
    """

    def __str__(self) -> str:   # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ''
