"""Table files: created atomically inside one directory, mapped shared, kept for the next run.

A file is a 4 KiB header (a magic line, then JSON: shape, dtype, byte count) followed by the rows.
It is created sparse (``ftruncate``), so it reads as zeros and takes disk space only for the pages
written. Creation is atomic: a hidden temporary file in the same directory gets its header and
size, then is renamed into place, so a file under its final name is always whole. A file that is
already there is mapped again (its rows kept) when its header matches; anything else (a foreign
file, a bad header, another shape or dtype, a short file) is an error naming the file and what is
wrong, and the file is left as it is.

The file is locked (``flock``) for as long as its rows are mapped, so a second table (in this
process or another) that would map the same file gets a clear error instead of silently sharing
rows. Files are opened relative to the directory and never through a symbolic link, so nothing is
created or changed outside the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Final

import torch

__all__ = ["HEADER_BYTES", "MAGIC", "MmapFileError", "file_name", "map_rows"]

HEADER_BYTES: Final = 4096  # a page: the rows start page-aligned
MAGIC: Final = b"shardrec-mmap-rows\n"
_VERSION: Final = 1
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_@+-]")


class MmapFileError(ValueError):
    """A table file that cannot be used: bad, short, in use, or in a directory that is not one."""


def file_name(*parts: str) -> str:
    """A file name from ``parts`` joined by dots, each reduced to ``[A-Za-z0-9_@+-]`` (other
    characters become ``%XX``), so no part can name another directory."""
    return ".".join(
        _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), p) for p in parts
    )


def _header(name: str, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> bytes:
    body = json.dumps(
        {
            "version": _VERSION,
            "name": name,
            "shape": list(shape),
            "dtype": str(dtype),
            "nbytes": nbytes,
        }
    ).encode()
    raw = MAGIC + body + b"\n"
    if len(raw) > HEADER_BYTES:
        raise MmapFileError(
            f"table file name {name!r} is too long for the {HEADER_BYTES}-byte header"
        )
    return raw.ljust(HEADER_BYTES, b"\0")


def _header_problem(raw: bytes, size: int, want: bytes) -> str | None:
    """What is wrong with a file that starts with ``raw`` and has ``size`` bytes, for rows whose
    header is ``want``; None when it holds them."""
    if not raw.startswith(MAGIC):
        return "not a shardrec mmap table file (its first bytes are not the magic line)"
    if size < HEADER_BYTES:
        return f"short file: {size} bytes, less than its {HEADER_BYTES}-byte header"
    try:
        meta = json.loads(raw[len(MAGIC) :].rstrip(b"\0"))
        wanted = json.loads(want[len(MAGIC) :].rstrip(b"\0"))
        nbytes = int(meta["nbytes"])
    except (ValueError, KeyError, TypeError):
        return "bad header (not the JSON a table file starts with)"
    for key in ("shape", "dtype"):
        if meta.get(key) != wanted[key]:
            return f"it holds rows of {key} {meta.get(key)}, not {wanted[key]}"
    expected = HEADER_BYTES + nbytes
    if size != expected:
        kind = "short" if size < expected else "long"
        return f"{kind} file: {size} bytes, its header says {expected}"
    return None


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_existing(dir_fd: int, name: str, header: bytes, where: Path) -> int | None:
    """The locked fd of the complete, unused table file ``name`` whose header matches ``header``,
    None when there is no file of that name; MmapFileError for anything else under it."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MmapFileError(
                f"{where} is a symbolic link; table files are never opened through one"
            ) from None
        raise MmapFileError(f"{where} exists and cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MmapFileError(f"{where} exists and is not a regular file")
        if not _lock(fd):
            raise MmapFileError(
                f"{where} is in use by another table (in this process or another): give each"
                " model its own directory"
            )
        problem = _header_problem(os.pread(fd, HEADER_BYTES, 0), st.st_size, header)
        if problem is not None:
            raise MmapFileError(
                f"{where}: {problem}; it is left as it is: remove it or choose another directory"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create(dir_fd: int, name: str, header: bytes, total: int, where: Path) -> int:
    """A new file ``name`` of ``total`` bytes starting with ``header``, locked; its fd."""
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, total)  # sparse: the rows read as zeros and use no disk until written
        if not _lock(fd):  # pragma: no cover - nobody else knows the temporary name
            raise MmapFileError(f"{where}: could not lock the new file")
        os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise MmapFileError(f"{where} could not be created: {exc}") from exc
        raise
    return fd


def map_rows(
    directory: str | os.PathLike[str], name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """A CPU tensor of ``shape`` and ``dtype`` whose bytes are the file ``directory/name``, and
    whether the file is new (then it reads as zeros) rather than one mapped again.

    ``name`` must be a plain file name (see :func:`file_name`). MmapFileError names the file when
    the directory cannot be opened, the name is taken by something that is not a complete, unused
    table file of this shape and dtype, or the file cannot be created.
    """
    if not name or "/" in name or name.startswith("."):
        raise MmapFileError(f"table file name {name!r} is not a plain file name")
    root = Path(directory)
    where = root / name
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    header = _header(name, shape, dtype, nbytes)
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MmapFileError(
            f"mmap storage directory {str(root)!r} cannot be opened: {exc.strerror}"
        ) from None
    try:
        fd = _open_existing(dir_fd, name, header, where)
        fresh = fd is None
        if fd is None:
            fd = _create(dir_fd, name, header, HEADER_BYTES + nbytes, where)
        try:
            # mmap keeps its own duplicate of fd, and with it the lock, while the rows are mapped.
            mapped = mmap.mmap(
                fd,
                HEADER_BYTES + nbytes,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    # The tensor holds a reference to the mapping: it is unmapped (and unlocked) with the last view.
    rows = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=HEADER_BYTES)
    return rows.view(dtype).view(shape), fresh
