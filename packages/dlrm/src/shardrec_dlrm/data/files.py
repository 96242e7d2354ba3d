"""Opening and writing files without trusting them: those a dataset names, and the small records
``dlrm`` keeps (``run_config.json``, ``synth.json``, ``metadata.json``, ``--config`` files).

A preprocessed directory may come from anyone: its ``metadata.json`` names the files to map, and
any of them may be a symlink, a FIFO or a device. So, before a file is opened:

- a name from metadata is one plain path component (no ``/``, no ``..``, not absolute);
- the file resolves (symlinks followed) to a path inside the dataset's directory;
- it is a regular file: checked with ``stat`` before opening (a FIFO would block ``open`` and a
  device may act on being opened), and again with ``fstat`` on the descriptor, which is opened
  non-blocking so that a file swapped for a FIFO in between cannot hang the run either;
- small files (metadata, records, configuration) are read with a size cap.

Large outputs go to a fresh temporary name (an existing one is removed first, never followed if it
is a symlink) and are renamed into place. Small records go through :func:`write_atomic`: a new
temporary file (``mkstemp``, ``O_EXCL``), fsynced, then renamed over the target (which replaces a
symlink there, never the file it points to), so readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

from .errors import DataError

#: ``metadata.json`` of a dataset with many thousands of parts stays far below this.
MAX_METADATA_BYTES: Final = 16 << 20
#: ``synth.json``, ``run_config.json``, ``<part>.resume.json``, ``--config``: a few KiB at most.
MAX_RECORD_BYTES: Final = 1 << 20
_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def plain_name(name: object, *, source: Path, what: str) -> str:
    """``name`` if it is one plain file-name component, else a :class:`DataError` naming
    ``source``."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or len(name) > 200
        or any(c in name for c in "/\\\0")
    ):
        raise DataError(f"{source}: {what} {name!r} is not a plain file name (no '/', no '..')")
    return name


def inside(root: Path, name: str) -> Path:
    """``root / name``, checked to resolve (symlinks followed) to a path inside ``root``."""
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise DataError(f"{path}: resolves to {real}, outside the dataset directory {real_root}")
    return path


def check_regular(path: Path) -> os.stat_result:
    """``stat`` of ``path`` (symlinks followed) if it is a regular file, else a
    :class:`DataError`."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: {_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (checked before and after
    opening)."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DataError(f"{path}: {_kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_small(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes:
    """The content of a small regular file, refused if it holds more than ``limit`` bytes (read up
    to ``limit + 1`` bytes, whatever its size claims)."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            # in pieces: read(limit + 1) would allocate the whole limit up front
            pieces: list[bytes] = []
            size = 0
            while size <= limit and (piece := f.read(min(1 << 16, limit + 1 - size))):
                pieces.append(piece)
                size += len(piece)
            data = b"".join(pieces)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise DataError(f"{path}: larger than {limit} bytes; not a file this shardrec wrote")
    return data


def create_new(path: Path) -> int:
    """A write descriptor of a new, empty ``path``: an existing file or symlink of that name is
    removed first (a symlink is never followed), a directory is an error."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        return os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
    except OSError as e:
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from None


def read_small_text(path: str | os.PathLike[str], limit: int = MAX_RECORD_BYTES) -> str:
    """The UTF-8 text of a small regular file (as :func:`read_small`)."""
    where = Path(path)
    data = read_small(where, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start})") from None


def write_atomic(
    path: str | os.PathLike[str], data: bytes | str, *, exclusive: bool = False
) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` all at once: readers see the old file or the
    new one, never part of either.

    ``exclusive``: fail with :class:`FileExistsError` if anything (a symlink included) is at
    ``path`` already, so that of two runs claiming a directory at once only one succeeds.
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(temporary, target)  # EEXIST whatever is there; never follows a symlink
        else:
            os.replace(temporary, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
