"""Property-based tests of the raw row parsers (TSV and CSV) and the chunker, against a plain
Python reading of the documented rules.

The rules (docs/data.md): 40 fields; the label is ``0`` or ``1``; a dense value is empty or an
integer of at most 18 digits (``-`` allowed; in CSV also written ``N.0``); a categorical is empty or
a hex id of at most 15 digits below 2**32. Anything else is a :class:`DataError` naming the file,
the line and the column, or with ``bad_rows="skip"`` a skipped row: no other exception, ever.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardrec_dlrm.data import DataError
from shardrec_dlrm.data.csvfmt import csv_columns, parse_csv
from shardrec_dlrm.data.schema import (
    COLUMN_NAMES,
    DENSE_NAMES,
    MAX_ID,
    MISSING_ID,
    NUM_DENSE,
    NUM_FIELDS,
    SPARSE_NAMES,
    transform_dense,
)
from shardrec_dlrm.data.sources import Chunk, iter_chunks
from shardrec_dlrm.data.tsv import parse_tsv

FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_DENSE_TSV = re.compile(r"-?[0-9]{1,18}", re.ASCII)
_DENSE_CSV = re.compile(r"-?([0-9]{1,18})(\.0*)?", re.ASCII)
_HEX = re.compile(r"[0-9a-fA-F]{1,15}", re.ASCII)
Row = tuple[int, tuple[int, ...], tuple[int, ...]]


def reference(fields: list[str], *, csv: bool = False) -> Row | str:
    """One row by the documented rules: (label, 13 raw dense, 26 ids), or the column at fault."""
    if len(fields) != NUM_FIELDS:
        return "fields"
    if csv:
        fields = [f.strip(" ") for f in fields]
    if fields[0] not in (("0", "1", "0.0", "1.0") if csv else ("0", "1")):
        return "label"
    dense = []
    for name, text in zip(DENSE_NAMES, fields[1 : 1 + NUM_DENSE], strict=True):
        if not text:
            dense.append(0)
        elif (_DENSE_CSV if csv else _DENSE_TSV).fullmatch(text):
            dense.append(int(text.split(".")[0]))
        else:
            return name
    sparse = []
    for name, text in zip(SPARSE_NAMES, fields[1 + NUM_DENSE :], strict=True):
        if not text:
            sparse.append(MISSING_ID)
        elif _HEX.fullmatch(text) and int(text, 16) <= MAX_ID:
            sparse.append(int(text, 16))
        else:
            return name
    return int(float(fields[0])), tuple(dense), tuple(sparse)


def _error(fn: Callable[[], object]) -> str | None:
    """The message of the DataError ``fn`` raises, or None; any other exception propagates."""
    try:
        fn()
    except DataError as e:
        return str(e)
    return None


def _assert_rows(got: object, want: list[Row]) -> None:
    labels, dense, sparse = got.labels, got.dense, got.sparse  # type: ignore[attr-defined]
    assert labels.tolist() == [r[0] for r in want]
    raw = np.array([r[1] for r in want], dtype=np.int64).reshape(-1, NUM_DENSE)
    np.testing.assert_array_equal(dense, transform_dense(raw))
    assert sparse.tolist() == [list(r[2]) for r in want]


# --- strategies ---------------------------------------------------------------------------------

_dense_value = st.one_of(st.just(""), st.integers(-(10**18) + 1, 10**18 - 1).map(str))


@st.composite
def _hex_id(draw: st.DrawFn) -> str:
    """An id below 2**32 with leading zeros up to 15 digits, in mixed case."""
    text = format(draw(st.integers(0, MAX_ID)), "x").zfill(draw(st.integers(1, 15)))
    upper = draw(st.integers(0, (1 << 15) - 1))
    return "".join(c.upper() if upper >> i & 1 else c for i, c in enumerate(text))


_good_row = st.tuples(
    st.sampled_from(["0", "1"]),
    st.lists(_dense_value, min_size=NUM_DENSE, max_size=NUM_DENSE),
    st.lists(st.one_of(st.just(""), _hex_id()), min_size=26, max_size=26),
).map(lambda t: [t[0], *t[1], *t[2]])
# Characters that matter to the parsers, and some that only look like they do.
_ALPHABET = "0123456789abcdefABCDEFgxX-+. _\r\0é٣\x85\u2028"
_field_text = st.text(alphabet=_ALPHABET, max_size=20) | st.sampled_from(
    ["-", "-0", "0x1f", "1_000", "1e5", "260.0", "ffffffff", "100000000", "9" * 19, "0" * 15 + "1"]
)


# --- TSV ----------------------------------------------------------------------------------------


@FAST
@given(st.lists(_good_row, min_size=1, max_size=6))
def test_tsv_good_rows_parse_to_their_values(rows: list[list[str]]) -> None:
    data = "".join("\t".join(r) + "\n" for r in rows).encode()
    got, skipped = parse_tsv(data, path="x", first_line=1)
    assert skipped == 0
    _assert_rows(got, [reference(r) for r in rows])  # type: ignore[misc]


@FAST
@given(
    st.lists(_good_row, min_size=1, max_size=4),
    st.data(),
)
def test_tsv_one_bad_field_is_named_by_line_and_column(
    rows: list[list[str]], data: st.DataObject
) -> None:
    r = data.draw(st.integers(0, len(rows) - 1))
    c = data.draw(st.integers(0, NUM_FIELDS - 1))
    rows[r][c] = data.draw(_field_text)
    text = "".join("\t".join(row) + "\n" for row in rows).encode()
    want = [reference(row) for row in rows]
    if c == NUM_FIELDS - 1 and rows[r][c].endswith("\r"):
        want[r] = reference([*rows[r][:-1], rows[r][c][:-1]])  # a CRLF line end
    if all(not isinstance(w, str) for w in want):
        got, _ = parse_tsv(text, path="x", first_line=1)
        _assert_rows(got, want)  # type: ignore[arg-type]
        return
    column = COLUMN_NAMES[c]
    with pytest.raises(DataError) as info:
        parse_tsv(text, path="x", first_line=1)
    message = str(info.value)
    assert message.startswith(f"x:{r + 1}: "), message
    assert column in message or "label" in message, message
    assert "\n" not in message
    got, skipped = parse_tsv(text, path="x", first_line=1, bad_rows="skip")
    assert skipped == 1
    _assert_rows(got, [w for w in want if not isinstance(w, str)])  # type: ignore[misc]


_line = st.lists(st.text(alphabet=_ALPHABET, max_size=6), min_size=1, max_size=44).map("\t".join)


@FAST
@given(st.lists(_line | _good_row.map("\t".join), min_size=1, max_size=5))
def test_tsv_any_lines_give_rows_or_a_data_error_never_another_exception(
    lines: list[str],
) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    want = [reference(line.removesuffix("\r").split("\t")) for line in lines]
    good = [w for w in want if not isinstance(w, str)]
    error = _error(lambda: parse_tsv(data, path="x", first_line=1))
    if error is None:
        assert len(good) == len(want)
    else:
        first_bad = next(i for i, w in enumerate(want) if isinstance(w, str))
        assert error.startswith(f"x:{first_bad + 1}: "), error
    got, skipped = parse_tsv(data, path="x", first_line=1, bad_rows="skip")
    assert skipped == len(want) - len(good)
    _assert_rows(got, good)  # type: ignore[arg-type]


@FAST
@given(st.binary(max_size=600))
def test_tsv_any_bytes_give_rows_or_a_data_error(data: bytes) -> None:
    data = data.replace(b"\n", b"\t") + b"\n" if data.count(b"\n") < 2 else data + b"\n"
    error = _error(lambda: parse_tsv(data, path="x", first_line=1))
    assert error is None or re.match(r"x:\d+: [^\n]*$", error), error
    parse_tsv(data, path="x", first_line=1, bad_rows="skip")


# --- CSV ----------------------------------------------------------------------------------------

HEADER = ",".join(COLUMN_NAMES)
COLUMNS = csv_columns(HEADER.encode(), "x")


@st.composite
def _csv_form(draw: st.DrawFn, row: list[str]) -> list[str]:
    """A row as pandas may write it: dense values sometimes as ``N.0``, spaces around fields."""
    out = list(row)
    for i in range(1, 1 + NUM_DENSE):
        if out[i] and draw(st.booleans()):
            out[i] += ".0"
    if draw(st.booleans()):
        i = draw(st.integers(0, NUM_FIELDS - 1))
        out[i] = f" {out[i]} "
    return out


@FAST
@given(st.lists(_good_row, min_size=1, max_size=5), st.data())
def test_csv_rows_parse_like_the_same_tsv_rows(rows: list[list[str]], data: st.DataObject) -> None:
    csv_rows = [data.draw(_csv_form(r)) for r in rows]
    text = "".join(",".join(r) + "\n" for r in csv_rows).encode()
    got, skipped = parse_csv(text, columns=COLUMNS, path="x", first_line=2)
    tsv, _ = parse_tsv("".join("\t".join(r) + "\n" for r in rows).encode(), path="x", first_line=2)
    assert skipped == 0
    np.testing.assert_array_equal(got.labels, tsv.labels)
    np.testing.assert_array_equal(got.dense, tsv.dense)
    np.testing.assert_array_equal(got.sparse, tsv.sparse)


@FAST
@given(st.lists(_good_row, min_size=1, max_size=4), st.data())
def test_csv_one_bad_field_is_named_by_line_and_column(
    rows: list[list[str]], data: st.DataObject
) -> None:
    r = data.draw(st.integers(0, len(rows) - 1))
    c = data.draw(st.integers(0, NUM_FIELDS - 1))
    rows[r][c] = data.draw(_field_text.filter(lambda t: not set(t) & set('\r"\x85\u2028')))
    text = "".join(",".join(row) + "\n" for row in rows).encode()
    want = [reference(row, csv=True) for row in rows]
    if isinstance(want[r], str):
        with pytest.raises(DataError) as info:
            parse_csv(text, columns=COLUMNS, path="x", first_line=2)
        assert str(info.value).startswith(f"x:{r + 2}: {COLUMN_NAMES[c]}"), str(info.value)
    got, skipped = parse_csv(text, columns=COLUMNS, path="x", first_line=2, bad_rows="skip")
    assert skipped == sum(isinstance(w, str) for w in want)
    _assert_rows(got, [w for w in want if not isinstance(w, str)])  # type: ignore[misc]


@FAST
@given(st.text(alphabet=_ALPHABET + ',"\n\t', max_size=400))
def test_csv_any_text_gives_rows_or_a_data_error(text: str) -> None:
    data = text.encode() + b"\n"
    for mode in ("error", "skip"):
        error = _error(
            lambda: parse_csv(data, columns=COLUMNS, path="x", first_line=2, bad_rows=mode)  # type: ignore[arg-type]  # noqa: B023
        )
        assert error is None or re.match(r"x:\d+: [^\n]*$", error), error


# --- chunking -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chunks") / "f"


@FAST
@given(
    data=st.binary(max_size=300).map(lambda b: b.replace(b"\x1f\x8b", b"")),
    chunk=st.integers(1, 40),
    max_line=st.integers(1, 60),
    skip=st.integers(0, 1),
)
def test_chunks_hold_whole_lines_and_refuse_exactly_the_overlong_ones(
    scratch: Path, data: bytes, chunk: int, max_line: int, skip: int
) -> None:
    scratch.write_bytes(data)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    limit = max(chunk, max_line)
    chunks: list[Chunk] = []
    error = _error(
        lambda: chunks.extend(iter_chunks(scratch, chunk, skip_lines=skip, max_line_bytes=max_line))
    )
    if error is not None:
        assert "a line longer than" in error, error
        number = int(error.split(":")[1])
        assert len(lines[number - 1]) > limit
        assert all(len(line) <= limit for line in lines[: number - 1])
        return
    assert all(len(line) <= limit for line in lines)
    assert b"".join(c.data for c in chunks) == b"".join(line + b"\n" for line in lines[skip:])
    line_no = 1 + skip
    for c in chunks:
        assert c.first_line == line_no
        assert c.lines == c.data.count(b"\n")
        line_no += c.lines
