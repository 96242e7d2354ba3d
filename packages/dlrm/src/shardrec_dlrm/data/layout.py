"""The preprocessed layout: flat little-endian column files per part plus one ``metadata.json``.

::

    DST/
      metadata.json             # what is below, the transform, the sources (see PreprocessedMeta)
      <part>.labels.u8          # uint8   [rows]        0/1
      <part>.dense.f32          # float32 [rows, 13]    log(1 + max(x, 0)), missing -> 0
      <part>.sparse.i64         # int64   [rows, 26]    raw 32-bit ids, -1 where missing

``<part>`` is ``day_N`` for the 1TB logs, ``train`` for Kaggle's train.txt, else the source file's
stem. The files hold no header: their shapes come from the metadata, and :func:`open_part` checks
each file's size against it (a mismatch is a one-line error), after :mod:`.files` checked that it
is a regular file inside the directory. Files are read with ``np.memmap`` (nothing loaded up
front); the values are checked batch by batch as they are read (:func:`check_values`). Every file,
``metadata.json`` included, is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .errors import DataError
from .files import (
    MAX_METADATA_BYTES,
    inside,
    open_regular,
    plain_name,
    read_small,
    write_atomic,
)
from .schema import (
    DENSE_MAX,
    DENSE_NAMES,
    DENSE_TRANSFORM,
    HASHING,
    MAX_ID,
    MISSING_ID,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_NAMES,
    SPARSE_TRANSFORM,
    Rows,
)
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


def write_metadata(root: Path, meta: PreprocessedMeta) -> None:
    text = json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n"
    write_atomic(root / METADATA_NAME, text)


def read_metadata(root: Path) -> PreprocessedMeta:
    """Read and check ``metadata.json``; errors are one line naming the file.

    The file must be a regular file inside ``root`` of at most :data:`.files.MAX_METADATA_BYTES`,
    and every part name a plain file name (see :mod:`.files`).
    """
    path = root / METADATA_NAME
    text = read_small(inside(root, METADATA_NAME), MAX_METADATA_BYTES)
    try:
        raw: Any = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != LAYOUT_NAME:
        raise DataError(f"{path}: not shardrec preprocessed Criteo metadata")
    if raw.get("version") != LAYOUT_VERSION:
        raise DataError(
            f"{path}: layout version {raw.get('version')!r}, this shardrec reads {LAYOUT_VERSION}"
        )
    try:
        parts = tuple(_part_meta(p, path) for p in raw["parts"])
        meta = PreprocessedMeta(
            source_format=str(raw["source_format"]),
            layout=raw["layout"],
            parts=parts,
            complete=bool(raw["complete"]),
            sources=tuple(str(s) for s in raw["sources"]),
            dense_transform=str(raw["dense_transform"]),
            sparse_transform=str(raw["sparse_transform"]),
            hashing=str(raw["hashing"]),
            columns=dict(raw["columns"]),
        )
    except (KeyError, TypeError, ValueError) as e:
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
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a part is listed twice")
    return meta


def _count(value: object) -> int:
    """A non-negative integer from JSON (``true`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _part_meta(raw: object, path: Path) -> PartMeta:
    if not isinstance(raw, dict):
        raise TypeError(f"a part is {type(raw).__name__}, not an object")
    name = plain_name(raw.get("name"), source=path, what="part name")
    try:
        rows = _count(raw["rows"])
    except ValueError:
        raise DataError(f"{path}: part {name!r} has an invalid row count {raw['rows']!r}") from None
    return PartMeta(
        name=name,
        rows=rows,
        bad_rows=_count(raw["bad_rows"]),
        source=str(raw["source"]),
        source_size=_count(raw["source_size"]),
        source_mtime_ns=int(raw["source_mtime_ns"]),
    )


def open_part(root: Path, part: PartMeta) -> Rows:
    """Memory-map one part's three files after checking that each is a regular file inside
    ``root`` whose size matches the metadata."""
    arrays = []
    for suffix, dtype, width in COLUMNS:
        path = inside(root, f"{part.name}.{suffix}")
        expected = part.rows * width * dtype.itemsize
        try:
            fd = open_regular(path)
        except DataError as e:
            reason = str(e).removeprefix(f"{path}: ")
            raise DataError(
                f"{path}: metadata lists part {part.name!r} but the file cannot be used ({reason})"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size != expected:
                raise DataError(
                    f"{path}: {size} bytes, but {METADATA_NAME} says {part.rows} rows "
                    f"({expected} bytes): the metadata does not match the files"
                )
            shape = (part.rows,) if width == 1 else (part.rows, width)
            if part.rows == 0:
                arrays.append(np.zeros(shape, dtype=dtype))
                continue
            with os.fdopen(fd, "rb", closefd=False) as f:
                arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=shape))
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        finally:
            os.close(fd)
    return Rows(arrays[0], arrays[1], arrays[2])


def check_values(root: Path, part: PartMeta, start: int, rows: Rows) -> None:
    """Check rows ``start..`` of a part as they are read: labels 0/1, dense values those of the
    transform (finite, in ``[0, DENSE_MAX]``), ids -1 (missing) or in ``[0, 2**32)``.

    The first bad value is a :class:`DataError` naming the file, the row (counted from 0 in the
    part) and the column. A few min/max reductions per batch: the reader benchmark
    (``tools/bench/criteo.py``) measures the cost.
    """
    if not len(rows):
        return
    labels, dense, sparse = rows.labels, rows.dense, rows.sparse
    if labels.max() > 1:
        i = int(np.argmax(labels > 1))
        raise DataError(
            f"{part.file(root, 'labels.u8')}: row {start + i}: label {int(labels[i])}, "
            "expected 0 or 1"
        )
    # not (lo <= x <= hi) also catches NaN
    if not (dense.min() >= 0.0 and dense.max() <= DENSE_MAX):
        bad = ~((dense >= 0.0) & (dense <= DENSE_MAX))
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise DataError(
            f"{part.file(root, 'dense.f32')}: row {start + i}: {DENSE_NAMES[j]} is "
            f"{float(dense[i, j])!r}, not a value of the dense transform (0 to {DENSE_MAX})"
        )
    if sparse.min() < MISSING_ID or sparse.max() > MAX_ID:
        bad = (sparse < MISSING_ID) | (sparse > MAX_ID)
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise DataError(
            f"{part.file(root, 'sparse.i64')}: row {start + i}: {SPARSE_NAMES[j]} id "
            f"{int(sparse[i, j])}, expected {MISSING_ID} (missing) or 0 <= id < 2**32"
        )
