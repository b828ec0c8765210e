"""User-facing errors: one line, the place, what is wrong and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in user input (recipe, file, prompt) that the user can fix.

    The CLI prints it as ``cstoolkit: error: <where>: <what>; <expected>`` and exits with code 2.
    """

    def __init__(self, where: str, what: str, expected: str | None = None):
        self.where = where
        self.what = what
        self.expected = expected
        msg = f"{where}: {what}" if where else what
        if expected:
            msg += f"; {expected}"
        super().__init__(msg)


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes non-finite; the last good checkpoint is kept."""
