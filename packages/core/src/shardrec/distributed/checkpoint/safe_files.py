"""The files of a checkpoint directory, opened so that a hostile checkpoint cannot lead a read
or a write anywhere else.

A checkpoint names its files by plain names (``.metadata``, ``__0_0.distcp``): every name must be a
single path component (no ``/``, no ``..``, not absolute), and what it names must be a regular file
in the checkpoint directory itself, not a symbolic link, FIFO, socket or device. Files are opened
with ``O_NOFOLLOW`` (a symbolic link is refused by the kernel, not by an earlier check that a swap
could outrun) and ``O_NONBLOCK`` (opening a FIFO does not wait for a writer), then checked with
``fstat`` on the open descriptor. New files are created with ``O_EXCL | O_NOFOLLOW``: a save never
writes through a link planted in its directory.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final, cast

from torch.distributed.checkpoint.filesystem import FileSystem

from shardrec.distributed.checkpoint.errors import CheckpointError

MEBIBYTE: Final = 1 << 20
METADATA_CAP: Final = 256 * MEBIBYTE
"""The largest ``.metadata`` read (DCP's index of every chunk of every key: a few hundred bytes a
chunk)."""
SIDECAR_CAP: Final = 16 * MEBIBYTE
"""The largest ``shardrec.json`` read."""

_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def member_name(directory: Path, name: object) -> str:
    """``name`` if it names a file directly inside ``directory``; else a CheckpointError."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise CheckpointError(
            f"{directory}: names the file {name!r}, which is not a plain file name inside the "
            "checkpoint directory"
        )
    return name


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def _not_regular(path: Path, mode: int) -> CheckpointError:
    return CheckpointError(
        f"{path}: is {_kind(mode)}; a checkpoint's files must be regular files inside its directory"
    )


def member_size(directory: Path, name: object) -> int:
    """The size of the regular file ``directory/name`` (not following a symbolic link)."""
    path = directory / member_name(directory, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st.st_size


def open_member(directory: Path, name: object) -> IO[bytes]:
    """``directory/name`` open for reading, if it is a regular file there (see module doc)."""
    path = directory / member_name(directory, name)
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(
                f"{path}: is a symbolic link; a checkpoint's files must be regular files inside "
                "its directory"
            ) from None
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return cast(IO[bytes], os.fdopen(fd, "rb"))
    except BaseException:
        os.close(fd)
        raise


def read_member(directory: Path, name: str, cap: int) -> bytes:
    """The whole of ``directory/name``, refused if it is larger than ``cap`` bytes."""
    with open_member(directory, name) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(cap + 1) if size <= cap else b""
    if size > cap or len(data) > cap:
        raise CheckpointError(
            f"{directory / name}: {max(size, len(data))} bytes, more than the {cap} a {name} "
            "file may have"
        )
    return data


def create_member(directory: Path, name: str) -> IO[bytes]:
    """A new file ``directory/name`` open for writing; an existing file or link there is an
    error."""
    path = directory / member_name(directory, name)
    try:
        fd = os.open(path, _CREATE_FLAGS, 0o644)
    except FileExistsError:
        raise CheckpointError(f"{path}: already exists (a save writes only new files)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be created ({exc.strerror})") from None
    return cast(IO[bytes], os.fdopen(fd, "wb"))


class SafeFileSystem(FileSystem):
    """DCP's file system, confined to one directory: every path DCP builds is a plain name in it,
    read with :func:`open_member` and written with :func:`create_member`."""

    def __init__(self, root: str | os.PathLike[Any]) -> None:
        super().__init__()
        self.root = Path(root)

    def _inside(self, path: str | os.PathLike[Any]) -> tuple[Path, str]:
        p = Path(path)
        if p.parent != self.root:
            raise CheckpointError(f"{p}: is not a file of the checkpoint directory {self.root}")
        return self.root, member_name(self.root, p.name)

    def concat_path(self, path: str | os.PathLike[Any], suffix: str) -> Path:
        if Path(path) != self.root:
            raise CheckpointError(f"{path}: is not the checkpoint directory {self.root}")
        return self.root / member_name(self.root, suffix)

    @contextmanager
    def create_stream(
        self, path: str | os.PathLike[Any], mode: str
    ) -> Generator[io.IOBase, None, None]:
        directory, name = self._inside(path)
        if mode not in ("rb", "wb"):
            raise CheckpointError(f"{path}: mode {mode!r} is not used for checkpoint files")
        opened = open_member(directory, name) if mode == "rb" else create_member(directory, name)
        with opened as stream:
            yield cast(io.IOBase, stream)

    def rename(self, path: str | os.PathLike[Any], new_path: str | os.PathLike[Any]) -> None:
        directory, old = self._inside(path)
        _, new = self._inside(new_path)
        os.replace(directory / old, directory / new)

    def rm_file(self, path: str | os.PathLike[Any]) -> None:
        directory, name = self._inside(path)
        os.unlink(directory / name)
