"""The one exception type of the data layer: a user-facing, one-line message naming the file (and
line)."""

from __future__ import annotations

from shardrec_dlrm.errors import UserError


class DataError(UserError):
    """Bad input data: the message names the file and, for a malformed row, its line number.

    A :class:`~shardrec_dlrm.errors.UserError`, so that one raised while training (a bad value
    found as a batch is read) ends the run with that one line, as one raised at open does. The CLI
    turns it into a one-line ``click.ClickException``; library callers can catch it as
    ``ValueError``.
    """


def row_error(path: str, line: int, reason: str) -> DataError:
    """The error for a malformed row: ``path:line: reason`` (lines count from 1)."""
    return DataError(f"{path}:{line}: {reason}")
