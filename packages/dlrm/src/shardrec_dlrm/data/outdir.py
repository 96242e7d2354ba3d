"""The output directory of ``dlrm preprocess`` and ``dlrm synth``: created, locked, and never
overwritten by surprise.

:func:`claim_output` creates the directory and takes an exclusive ``flock`` on ``DST/.dlrm.lock``
for as long as the command writes. A second command on the same directory is refused at once,
not queued, and not allowed to interleave its files with the first one's. The kernel drops the lock
when its process ends however it ends (``kill -9`` included), so a crash never leaves a stale lock
behind. The lock file itself stays (removing it while another process may be opening it would let
two processes lock two different files); it is hidden, so raw-directory listings skip it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from .errors import DataError

LOCK_NAME: Final = ".dlrm.lock"


@dataclass(frozen=True, slots=True)
class OutputDir:
    """A locked output directory and what was in it when the lock was taken (the lock file
    aside)."""

    root: Path
    entries: tuple[str, ...]


@contextlib.contextmanager
def claim_output(root: Path) -> Iterator[OutputDir]:
    """Create ``root`` if needed and hold its lock for the duration of the ``with`` block."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the output directory: {e.strerror or e}") from None
    lock = root / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DataError(f"{lock}: cannot create the lock file: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"{root}: another dlrm preprocess or synth is writing to this directory (it "
                f"holds {LOCK_NAME}); wait for it to end"
            ) from None
        try:
            entries = tuple(sorted(e.name for e in os.scandir(root) if e.name != LOCK_NAME))
        except OSError as e:
            raise DataError(f"{root}: cannot list the output directory: {e.strerror}") from None
        yield OutputDir(root, entries)
    finally:
        os.close(fd)


def refuse_non_empty(out: OutputDir, command: str) -> NoReturn:
    """The error for writing into a directory that already holds files, without ``force``."""
    shown = ", ".join(out.entries[:3]) + (", ..." if len(out.entries) > 3 else "")
    raise DataError(
        f"{out.root}: not empty ({shown}); `dlrm {command}` writes into an empty or new "
        "directory: pass --force (force=True) to write here anyway"
    )
