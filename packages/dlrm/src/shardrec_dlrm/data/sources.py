"""Finding the data files of a path, telling their format, and streaming them in line-aligned
chunks.

Layouts (how splits are cut, see :mod:`.splits`):

- ``kaggle``: a file named ``train.txt`` (or ``train.txt.gz``), or a directory holding one. Only
  that file is read (Kaggle's ``test.txt`` has no labels).
- ``terabyte``: a directory of ``day_0`` .. ``day_23`` (plain or ``.gz``), read in day order. At
  least two days.
- ``files``: anything else: the file itself, or every regular, non-hidden file of the directory in
  name order (``*.json`` and ``*.md`` excepted).

Gzip is recognised by its magic bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal

from .errors import DataError
from .files import open_regular
from .schema import COLUMN_NAMES, NUM_FIELDS

Format = Literal["auto", "tsv", "csv", "preprocessed"]
FORMATS: Final = ("auto", "tsv", "csv", "preprocessed")
Layout = Literal["kaggle", "terabyte", "files"]
METADATA_NAME: Final = "metadata.json"
#: The longest raw line read: Criteo rows are a few hundred bytes, a CSV header about as long.
MAX_LINE_BYTES: Final = 64 << 10
_DAY = re.compile(r"^day_(\d+)(\.gz)?$")
_KAGGLE = ("train.txt", "train.txt.gz")
_IGNORED_SUFFIXES = (".json", ".md")
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One raw input file: its path, its part name (``day_3``, ``train``, the file stem) and its
    format."""

    path: Path
    part: str
    format: Literal["tsv", "csv"]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True, slots=True)
class Discovered:
    """What a path holds: preprocessed output (``files`` empty), or raw files with a layout."""

    root: Path
    format: Literal["tsv", "csv", "preprocessed"]
    layout: Layout
    files: tuple[SourceFile, ...]


def _part_name(path: Path) -> str:
    name = path.name
    if name.endswith(".gz"):
        name = name[:-3]
    stem = name.split(".")[0]
    return stem or name


def _check_readable(path: Path) -> None:
    fd = open_regular(path)
    try:
        os.read(fd, 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _open_raw(path: Path) -> BinaryIO:
    """A raw source opened for reading: a regular file (a FIFO or a device is refused)."""
    return os.fdopen(open_regular(path), "rb")


def is_gzip(path: Path) -> bool:
    with _open_raw(path) as f:
        try:
            return f.read(2) == _GZIP_MAGIC
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _first_line(path: Path) -> bytes:
    with open_binary(path) as f:
        try:
            return f.readline(1 << 16)
        except (EOFError, OSError, zlib.error) as e:
            raise _stream_error(path, e) from None


def sniff_format(path: Path) -> Literal["tsv", "csv"]:
    """Tell raw TSV from CSV with a header by the first line; if neither, ask for ``--format``."""
    line = _first_line(path).rstrip(b"\r\n")
    if not line:
        raise DataError(f"{path}: empty file (no rows)")
    if line.count(b"\t") == NUM_FIELDS - 1:
        return "tsv"
    header = [c.strip().strip('"') for c in line.decode("utf-8", "replace").split(",")]
    if "label" in header and set(COLUMN_NAMES) <= set(header):
        return "csv"
    raise DataError(
        f"{path}: cannot tell the format: the first line is neither {NUM_FIELDS} tab-separated "
        "fields "
        "nor a CSV header naming label,I1..I13,C1..C26 (use --format tsv|csv)"
    )


def discover(path: str | os.PathLike[str], format: Format = "auto") -> Discovered:
    """Find the data under ``path`` and its format (``format`` overrides detection)."""
    root = Path(path)
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if root.is_dir():
        if os.path.lexists(root / METADATA_NAME) and format in ("auto", "preprocessed"):
            return Discovered(root, "preprocessed", "files", ())
        if format == "preprocessed":
            raise DataError(f"{root}: not a preprocessed directory (no {METADATA_NAME})")
        try:
            entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        except OSError as e:
            raise DataError(f"{root}: cannot list directory: {e.strerror or e}") from None
        files = [p for p in entries if p.is_file() and not p.name.endswith(_IGNORED_SUFFIXES)]
        if not files:
            raise DataError(f"{root}: empty directory (no data files)")
        kaggle = [p for p in files if p.name in _KAGGLE]
        days = sorted(
            ((int(m.group(1)), p) for p in files if (m := _DAY.match(p.name))),
            key=lambda t: t[0],
        )
        layout: Layout
        if kaggle:
            chosen, layout = [kaggle[0]], "kaggle"
        elif len(days) >= 2:
            numbers = [d for d, _ in days]
            if len(set(numbers)) != len(numbers):
                raise DataError(f"{root}: the same day appears twice (plain and .gz?)")
            chosen, layout = [p for _, p in days], "terabyte"
        else:
            chosen, layout = files, "files"
    else:
        if format == "preprocessed":
            raise DataError(f"{root}: a preprocessed dataset is a directory with {METADATA_NAME}")
        chosen = [root]
        layout = "kaggle" if root.name in _KAGGLE else "files"
    for p in chosen:
        _check_readable(p)
    fmts = [format if format != "auto" else sniff_format(p) for p in chosen]
    if len(set(fmts)) > 1:
        raise DataError(f"{root}: mixes TSV and CSV files; give one format per directory")
    parts = [_part_name(p) for p in chosen]
    if len(set(parts)) != len(parts):
        raise DataError(f"{root}: two files give the same part name ({', '.join(parts)})")
    fmt: Literal["tsv", "csv"] = "csv" if fmts[0] == "csv" else "tsv"
    files_ = tuple(SourceFile(p, n, fmt) for p, n in zip(chosen, parts, strict=True))
    return Discovered(root, fmt, layout, files_)


@contextmanager
def open_binary(path: Path) -> Iterator[BinaryIO]:
    """Open a plain or gzip file for binary reading; an unreadable file is a :class:`DataError`."""
    with _open_raw(path) as raw:
        if raw.read(2) == _GZIP_MAGIC:
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            raw.seek(0)
            yield raw


def _stream_error(path: Path, e: BaseException) -> DataError:
    if isinstance(e, EOFError):
        return DataError(f"{path}: truncated gzip file (it ends before its end-of-stream marker)")
    if isinstance(e, (gzip.BadGzipFile, zlib.error)):
        return DataError(f"{path}: corrupt gzip data ({e})")
    if isinstance(e, OSError):
        return DataError(f"{path}: cannot read: {e.strerror or e}")
    return DataError(f"{path}: {e}")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Whole lines of a file: ``data`` ends with a newline, its first line is number
    ``first_line``."""

    first_line: int
    data: bytes
    #: Bytes of the file consumed so far (compressed bytes for gzip): for progress bars.
    consumed: int
    #: Offset, in the (decompressed) text, just after this chunk's last line: where to resume.
    end_offset: int
    #: Lines in ``data``.
    lines: int


def _skip(stream: BinaryIO, n: int, path: Path, *, gz: bool) -> None:
    """Move ``n`` bytes into ``stream`` (seek for plain files; decompress and drop for gzip)."""
    if not gz:
        stream.seek(n)
        return
    while n > 0:
        block = stream.read(min(n, 8 << 20))
        if not block:
            raise DataError(f"{path}: shorter than the offset to resume from; it changed?")
        n -= len(block)


def iter_chunks(
    path: Path,
    chunk_bytes: int,
    *,
    skip_lines: int = 0,
    start_offset: int = 0,
    first_line: int = 1,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[Chunk]:
    """Stream ``path`` in chunks of about ``chunk_bytes``, each holding whole lines.

    Memory: one chunk plus the start of the line that straddles two reads. That line may be at
    most ``max(max_line_bytes, chunk_bytes)`` long: a longer one is a :class:`DataError` as soon as
    that many bytes passed without a newline, so a file without newlines costs no more memory than
    a good one. ``skip_lines`` drops leading lines (a CSV header). ``start_offset``/``first_line``
    resume after a chunk's ``end_offset``.
    """
    line_no = first_line
    offset = start_offset
    limit = max(max_line_bytes, chunk_bytes)
    # the start of the line that straddles reads, in pieces (joined once, when its newline comes)
    carry: list[bytes] = []
    carried = 0

    def too_long() -> DataError:
        return DataError(
            f"{path}:{line_no}: a line longer than {limit} bytes (no newline in them); Criteo "
            "rows are a few hundred bytes: is this a text file of rows?"
        )

    with _open_raw(path) as raw:
        gz = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
        try:
            _skip(stream, start_offset, path, gz=gz)
            while True:
                block = stream.read(chunk_bytes)
                if not block:
                    break
                cut = block.rfind(b"\n") + 1
                if cut == 0:
                    carry.append(block)
                    carried += len(block)
                    if carried > limit:
                        raise too_long()
                    continue
                if carry:
                    if carried + block.find(b"\n") > limit:
                        raise too_long()
                    data = b"".join([*carry, block[:cut]])
                else:
                    data = block[:cut] if cut < len(block) else block
                carry = [block[cut:]] if cut < len(block) else []
                carried = len(block) - cut
                while skip_lines and data:
                    nl = data.find(b"\n") + 1
                    data = data[nl:]
                    offset += nl
                    skip_lines -= 1
                    line_no += 1
                if data:
                    offset += len(data)
                    lines = data.count(b"\n")
                    yield Chunk(line_no, data, raw.tell(), offset, lines)
                    line_no += lines
        except (EOFError, OSError, zlib.error) as e:
            raise _stream_error(path, e) from None
        if carry and not skip_lines:  # a last line without its newline
            yield Chunk(line_no, b"".join([*carry, b"\n"]), raw.tell(), offset + carried, 1)
