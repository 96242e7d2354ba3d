"""The preprocessed layout: flat little-endian column files per part plus one ``metadata.json``.

::

    DST/
      metadata.json             # what is below, the transform, the sources (see PreprocessedMeta)
      <part>.labels.u8          # uint8   [rows]        0/1
      <part>.dense.f32          # float32 [rows, 13]    log(1 + max(x, 0)), missing -> 0
      <part>.sparse.i64         # int64   [rows, 26]    raw 32-bit ids, -1 where missing

``<part>`` is ``day_N`` for the 1TB logs, ``train`` for Kaggle's train.txt, else the source file's
stem. The files hold no header: their shapes come from the metadata, and :func:`open_part` checks
each file's size against it (a mismatch is a one-line error). Files are read with ``np.memmap``
(nothing loaded up front), and every file, ``metadata.json`` included, is written to a temporary
name and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .errors import DataError
from .schema import DENSE_TRANSFORM, HASHING, NUM_DENSE, NUM_SPARSE, SPARSE_TRANSFORM, Rows
from .sources import METADATA_NAME, Layout

LAYOUT_NAME: Final = "shardrec-criteo-preprocessed"
LAYOUT_VERSION: Final = 1
#: (suffix, dtype, values per row) of the three column files.
COLUMNS: Final[tuple[tuple[str, np.dtype[Any], int], ...]] = (
    ("labels.u8", np.dtype("<u1"), 1),
    ("dense.f32", np.dtype("<f4"), NUM_DENSE),
    ("sparse.i64", np.dtype("<i8"), NUM_SPARSE),
)


@dataclass(frozen=True, slots=True)
class PartMeta:
    """One preprocessed part (one source file): its name, rows, and the source it came from."""

    name: str
    rows: int
    bad_rows: int
    source: str
    source_size: int
    source_mtime_ns: int

    def file(self, root: Path, suffix: str) -> Path:
        return root / f"{self.name}.{suffix}"


@dataclass(frozen=True, slots=True)
class PreprocessedMeta:
    """The content of ``metadata.json``; ``complete`` is false while ``dlrm preprocess`` is still
    running."""

    source_format: str
    layout: Layout
    parts: tuple[PartMeta, ...]
    complete: bool
    sources: tuple[str, ...]
    dense_transform: str = DENSE_TRANSFORM
    sparse_transform: str = SPARSE_TRANSFORM
    hashing: str = HASHING
    format: str = LAYOUT_NAME
    version: int = LAYOUT_VERSION
    columns: dict[str, str] = field(default_factory=lambda: {s: d.str for s, d, _ in COLUMNS})

    @property
    def num_rows(self) -> int:
        return sum(p.rows for p in self.parts)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_metadata(root: Path, meta: PreprocessedMeta) -> None:
    text = json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(root / METADATA_NAME, text.encode())


def read_metadata(root: Path) -> PreprocessedMeta:
    """Read and check ``metadata.json``; errors are one line naming the file."""
    path = root / METADATA_NAME
    try:
        raw: Any = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != LAYOUT_NAME:
        raise DataError(f"{path}: not shardrec preprocessed Criteo metadata")
    if raw.get("version") != LAYOUT_VERSION:
        raise DataError(
            f"{path}: layout version {raw.get('version')!r}, this shardrec reads {LAYOUT_VERSION}"
        )
    try:
        parts = tuple(PartMeta(**p) for p in raw["parts"])
        meta = PreprocessedMeta(
            source_format=str(raw["source_format"]),
            layout=raw["layout"],
            parts=parts,
            complete=bool(raw["complete"]),
            sources=tuple(raw["sources"]),
            dense_transform=str(raw["dense_transform"]),
            sparse_transform=str(raw["sparse_transform"]),
            hashing=str(raw["hashing"]),
            columns=dict(raw["columns"]),
        )
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed metadata ({e})") from None
    if meta.layout not in ("kaggle", "terabyte", "files"):
        raise DataError(f"{path}: unknown layout {meta.layout!r}")
    if (meta.dense_transform, meta.sparse_transform) != (DENSE_TRANSFORM, SPARSE_TRANSFORM):
        raise DataError(
            f"{path}: made with another transform ({meta.dense_transform!r}, "
            f"{meta.sparse_transform!r}): preprocess the raw data again"
        )
    if meta.columns != {s: d.str for s, d, _ in COLUMNS}:
        raise DataError(f"{path}: column dtypes {meta.columns} differ from this shardrec's layout")
    for p in parts:
        rows: object = p.rows
        if not isinstance(rows, int) or rows < 0:
            raise DataError(f"{path}: part {p.name!r} has an invalid row count {p.rows!r}")
    return meta


def open_part(root: Path, part: PartMeta) -> Rows:
    """Memory-map one part's three files after checking their sizes against the metadata."""
    arrays = []
    for suffix, dtype, width in COLUMNS:
        path = part.file(root, suffix)
        expected = part.rows * width * dtype.itemsize
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataError(
                f"{path}: metadata lists part {part.name!r} but the file cannot be read "
                f"({e.strerror or e})"
            ) from None
        if size != expected:
            raise DataError(
                f"{path}: {size} bytes, but {METADATA_NAME} says {part.rows} rows "
                f"({expected} bytes): the metadata does not match the files"
            )
        shape = (part.rows,) if width == 1 else (part.rows, width)
        if part.rows == 0:
            arrays.append(np.zeros(shape, dtype=dtype))
            continue
        try:
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=shape))
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return Rows(arrays[0], arrays[1], arrays[2])
