"""The trainer's user-facing error: one line that the command line prints, never a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake of whoever runs ``dlrm``: bad data, a missing checkpoint, an impossible plan."""
