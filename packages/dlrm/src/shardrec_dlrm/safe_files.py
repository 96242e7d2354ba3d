"""The small files ``dlrm`` keeps beside its checkpoints and reads from places it did not make.

Writes go through a fresh temporary file in the target's directory (``mkstemp`` creates it with
``O_EXCL``, so never through a symlink someone left there), fsynced, then moved into place with one
``rename`` (which replaces a symlink at the target, never the file it points to). Reads accept only
small regular files: a FIFO, a device such as ``/dev/zero`` or a huge file is refused in one line
instead of hanging or flooding memory.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

from shardrec_dlrm.errors import UserError

#: The largest configuration file ``dlrm`` reads (a run_config.json is about 1 KiB).
MAX_SMALL_FILE_BYTES: Final = 1 << 20


def read_small_text(path: str | os.PathLike[str], *, limit: int = MAX_SMALL_FILE_BYTES) -> str:
    """The UTF-8 text of ``path``, which must be a regular file of at most ``limit`` bytes."""
    where = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise UserError(f"cannot read {where}: {error.strerror}") from error
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{where}: not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{where}: larger than {limit} bytes, not a dlrm configuration file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{where}: not UTF-8 text (byte {error.start})") from error


def write_text_atomic(path: str | os.PathLike[str], text: str, *, exclusive: bool) -> None:
    """Writes ``text`` to ``path`` all at once: readers see the old file or the new one.

    ``exclusive``: fail with :class:`FileExistsError` if anything (a symlink included) is at
    ``path`` already, so that of two runs claiming a directory at once only one succeeds.
    """
    target = Path(path)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o644)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if exclusive:
            os.link(temporary, target)  # EEXIST whatever is there; never follows a symlink
        else:
            os.replace(temporary, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
