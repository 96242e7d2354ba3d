"""The one error type of checkpoints: bad or mismatched input, named precisely."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read into this model; the message names the key and
    shapes."""
