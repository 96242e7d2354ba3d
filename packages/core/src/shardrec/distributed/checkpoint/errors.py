"""The error and warning types of checkpoints: bad or mismatched input, named precisely."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read into this model; the message names the key and
    shapes, or the file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files do not match the list its ``shardrec.json`` recorded when it was
    saved (a file missing, of another size, or with another checksum), or that list itself is
    unreadable. The message is one line naming the file and what is wrong with it."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint saved before shardrec recorded checksums was read without verifying its
    files."""
