"""CSV with a header naming ``label,I1..I13,C1..C26`` (in any order; extra columns are ignored).

Some projects ship Criteo samples this way (DeepCTR's ``criteo_sample.txt``), with dense values
written as floats (``260.0``) after a pandas round trip. Dense values may therefore be integers or
integral floats (``260.0``, at most 18 digits before the point); any other value, a label other than
0/1, or a categorical that is not a 32-bit hex id is a malformed row, as in TSV. Fields are stripped
of surrounding spaces. A line the ``csv`` module itself refuses (a field over its size limit) is an
error even with ``bad_rows="skip"``. Rows are parsed with Python's ``csv`` module, which is far
slower than the TSV path: fine for samples, not for the full dataset.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import DataError, row_error
from .schema import (
    COLUMN_NAMES,
    DENSE_NAMES,
    MAX_ID,
    MISSING_ID,
    NUM_DENSE,
    SPARSE_NAMES,
    Rows,
    transform_dense,
)
from .tsv import BadRows


def csv_columns(header_line: bytes, path: str) -> list[int]:
    """Column index of label, I1..I13, C1..C26 in a header line."""
    header = next(csv.reader([header_line.decode("utf-8", "replace").strip("\r\n")]))
    names = [h.strip() for h in header]
    missing = [c for c in COLUMN_NAMES if c not in names]
    if missing:
        raise DataError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)}")
    return [names.index(c) for c in COLUMN_NAMES]


# What the TSV parser takes, in ASCII only (Python's int() would also take '1_000', '0x12' and
# non-ASCII digits): an integer of at most 18 digits, here also written as an integral float.
_DENSE = re.compile(r"-?([0-9]{1,18})(\.0*)?", re.ASCII)
_SPARSE = re.compile(r"[0-9a-fA-F]{1,15}", re.ASCII)


def _dense_value(text: str) -> int:
    if not text:
        return 0
    if _DENSE.fullmatch(text) is None:
        raise ValueError(text)
    return int(text.split(".", 1)[0])


def _sparse_value(text: str) -> int:
    if not text:
        return MISSING_ID
    if _SPARSE.fullmatch(text) is None:
        raise ValueError(text)
    value = int(text, 16)
    if value > MAX_ID:
        raise OverflowError(text)
    return value


def _records(reader: Any, path: str, first_line: int) -> Iterator[list[str]]:
    """The reader's records; its own errors (a field over its size limit) named by file and
    line."""
    while True:
        try:
            fields: list[str] = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise row_error(path, first_line + reader.line_num - 1, f"not CSV ({e})") from None
        yield fields


def parse_csv(
    data: bytes, *, columns: list[int], path: str, first_line: int, bad_rows: BadRows = "error"
) -> tuple[Rows, int]:
    """Parse whole CSV lines (no header) with the header's ``columns``; returns (rows, skipped)."""
    width = max(columns) + 1
    labels: list[int] = []
    dense: list[list[int]] = []
    sparse: list[list[int]] = []
    skipped = 0
    reader = csv.reader(io.StringIO(data.decode("utf-8", "replace"), newline=""))
    line = first_line
    for fields in _records(reader, path, first_line):
        this_line = line
        line = first_line + reader.line_num
        try:
            if len(fields) < width:
                raise DataError(
                    f"expected at least {width} comma-separated fields, found {len(fields)}"
                )
            label = fields[columns[0]].strip()
            if label not in ("0", "1", "0.0", "1.0"):
                raise DataError(f"label must be 0 or 1, found {label!r}")
            d_row = []
            for name, c in zip(DENSE_NAMES, columns[1 : 1 + NUM_DENSE], strict=True):
                try:
                    d_row.append(_dense_value(fields[c].strip()))
                except ValueError:
                    raise DataError(f"{name} is not an integer: {fields[c]!r}") from None
            s_row = []
            for name, c in zip(SPARSE_NAMES, columns[1 + NUM_DENSE :], strict=True):
                try:
                    s_row.append(_sparse_value(fields[c].strip()))
                except ValueError:
                    raise DataError(f"{name} is not a hex id: {fields[c]!r}") from None
                except OverflowError:
                    raise DataError(f"{name} is not a 32-bit hex id: {fields[c]!r}") from None
        except DataError as e:
            if bad_rows == "error":
                raise row_error(path, this_line, str(e)) from None
            skipped += 1
            continue
        labels.append(int(float(label)))
        dense.append(d_row)
        sparse.append(s_row)
    if not labels:
        return Rows.empty(), skipped
    rows = Rows(
        np.asarray(labels, dtype=np.uint8),
        transform_dense(np.asarray(dense, dtype=np.int64)),
        np.asarray(sparse, dtype=np.int64),
    )
    return rows, skipped
