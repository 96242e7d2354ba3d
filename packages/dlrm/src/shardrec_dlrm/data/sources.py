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
from .schema import COLUMN_NAMES, NUM_FIELDS

Format = Literal["auto", "tsv", "csv", "preprocessed"]
FORMATS: Final = ("auto", "tsv", "csv", "preprocessed")
Layout = Literal["kaggle", "terabyte", "files"]
METADATA_NAME: Final = "metadata.json"
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
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def is_gzip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
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
        if (root / METADATA_NAME).exists() and format in ("auto", "preprocessed"):
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
    try:
        raw = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with raw:
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
) -> Iterator[Chunk]:
    """Stream ``path`` in chunks of about ``chunk_bytes``, each holding whole lines.

    Memory: one chunk plus the tail of the line that straddles two reads (a line longer than
    ``chunk_bytes`` grows the buffer to that line). ``skip_lines`` drops leading lines (a CSV
    header). ``start_offset``/``first_line`` resume after a chunk's ``end_offset``.
    """
    line_no = first_line
    offset = start_offset
    carry = b""
    try:
        raw = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with raw:
        gz = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
        try:
            _skip(stream, start_offset, path, gz=gz)
            while True:
                block = stream.read(chunk_bytes)
                if not block:
                    break
                data = carry + block if carry else block
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                carry = data[cut:]
                data = data[:cut]
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
            yield Chunk(line_no, carry + b"\n", raw.tell(), offset + len(carry), 1)
