"""Errors and warnings that reach the user as one readable line."""

from __future__ import annotations

__all__ = ["CellpertError", "CellpertInputError", "CellpertWarning"]


class CellpertError(Exception):
    """Base class of every error cellpert raises on purpose.

    The message is one line that names the problem and the fix; the CLI prints it
    without a traceback (unless ``--debug``).
    """


class CellpertInputError(CellpertError, ValueError):
    """The user's input (file, key, option, matrix) cannot be used as given."""


class CellpertWarning(UserWarning):
    """Something the user should know about the input, that does not stop the run."""
