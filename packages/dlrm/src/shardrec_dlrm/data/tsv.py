"""Vectorised parsing of raw Criteo TSV: whole lines of bytes in, :class:`~.schema.Rows` out.

No Python loop runs per row: field boundaries come from one scan for tabs and newlines, and numbers
are assembled digit by digit over all fields at once (right-aligned, one pass per digit position). A
row with the wrong number of fields, a label other than 0/1, a dense value that is not an integer of
at most 18 digits, or a categorical that is not a 32-bit hex id (at most 15 digits, leading zeros
allowed) is an error naming the file and line, or is dropped and counted with ``bad_rows="skip"``.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from .errors import row_error
from .schema import (
    DENSE_NAMES,
    MAX_ID,
    MISSING_ID,
    NUM_DENSE,
    NUM_FIELDS,
    SPARSE_NAMES,
    Rows,
    transform_dense,
)

BadRows = Literal["error", "skip"]
_TAB: Final = 9
_NL: Final = 10
_MINUS: Final = 45
_MAX_DEC_DIGITS: Final = 18
_MAX_HEX_DIGITS: Final = 15
_BAD: Final = 255
_PAD: Final = 8
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


def _digit_table(base: int) -> npt.NDArray[np.uint8]:
    table = np.full(256, _BAD, dtype=np.uint8)
    table[ord("0") : ord("9") + 1] = np.arange(10)
    if base == 16:
        table[ord("a") : ord("f") + 1] = np.arange(10, 16)
        table[ord("A") : ord("F") + 1] = np.arange(10, 16)
    return table


_DEC: Final = _digit_table(10)
_HEX: Final = _digit_table(16)


_U = np.uint64
_ZEROS: Final = _U(0x3030303030303030)
_LOW_NIBBLES: Final = _U(0x0F0F0F0F0F0F0F0F)
_ONES: Final = _U(0x0101010101010101)
_HIGH_BITS: Final = _U(0x8080808080808080)
#: _KEEP[k] keeps the last k bytes of a little-endian word (the last k characters before a field's
#: end).
_KEEP: Final = np.array(
    [0, *(((1 << 64) - 1) ^ ((1 << (8 * (8 - k))) - 1) for k in range(1, 9))], dtype=np.uint64
)


def _swar_decimal(w: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Eight ASCII digits per word (most significant first) -> value; bad where not a digit."""
    x = w ^ _ZEROS
    bad = (((x + _U(0x7676767676767676)) | x) & _HIGH_BITS) != 0
    x = (x * _U(10) + (x >> _U(8))) & _U(0x00FF00FF00FF00FF)
    x = (x * _U(100) + (x >> _U(16))) & _U(0x0000FFFF0000FFFF)
    x = (x * _U(10000) + (x >> _U(32))) & _U(0x00000000FFFFFFFF)
    return x.astype(np.int64), bad


def _swar_hex(w: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Eight lowercase hex digits per word -> value; bad where re-encoding does not match."""
    nib = (w & _LOW_NIBBLES) + ((w >> _U(6)) & _ONES) * _U(9)
    above9 = ((nib + _U(0x0606060606060606)) >> _U(4)) & _ONES
    # a nibble above 15 ('g' -> 16) re-encodes to itself, so check the range too
    bad = ((nib + _ZEROS + above9 * _U(39)) != w) | ((nib & ~_LOW_NIBBLES) != 0)
    x = nib
    x = ((x & _U(0x000F000F000F000F)) << _U(4)) | ((x >> _U(8)) & _U(0x000F000F000F000F))
    x = ((x & _U(0x000000FF000000FF)) << _U(8)) | ((x >> _U(16)) & _U(0x000000FF000000FF))
    x = ((x & _U(0x000000000000FFFF)) << _U(16)) | ((x >> _U(32)) & _U(0x000000000000FFFF))
    return x.astype(np.int64), bad


def _parse_slow(
    buf: npt.NDArray[np.uint8],
    ends: npt.NDArray[np.int64],
    digits: npt.NDArray[np.int64],
    base: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Digit by digit, for the few fields the word-at-a-time path cannot take (long, upper-case)."""
    table = _HEX if base == 16 else _DEC
    limit = _MAX_HEX_DIGITS if base == 16 else _MAX_DEC_DIGITS
    values = np.zeros(ends.shape[0], dtype=np.int64)
    bad = digits > limit
    scale = 1
    for k in range(int(min(int(digits.max(initial=0)), limit))):
        has = digits > k
        d = table[buf[np.where(has, ends - 1 - k, 0)]]
        bad |= has & (d == _BAD)
        values += np.where(has, d, 0).astype(np.int64) * scale
        scale *= base
    return values, bad


def _parse_numbers(
    buf: npt.NDArray[np.uint8],
    words: npt.NDArray[np.uint64],
    ends: npt.NDArray[np.int64],
    lens: npt.NDArray[np.int64],
    *,
    base: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Parse the fields ``buf[ends - lens : ends]`` as integers; returns (values, bad). Empty -> 0.

    ``ends`` and ``lens`` may have any shape (strided views included). ``words[p]`` is the unaligned
    little-endian 64-bit word at byte ``p``; ``buf`` starts with 8 bytes of padding so that
    ``ends - 8`` is never negative. Fields of up to 8 digits are parsed eight characters at a time
    (SWAR); the rest go digit by digit.
    """
    neg = None
    digits = lens
    if base == 10:
        neg = (lens > 0) & (buf[ends - lens] == _MINUS)
        digits = lens - neg
    keep = _KEEP[np.minimum(digits, 8)]
    w = (words[ends - 8] & keep) | (_ZEROS & ~keep)
    values, bad = _swar_hex(w) if base == 16 else _swar_decimal(w)
    retry = np.nonzero((digits > 8) | bad) if base == 16 else np.nonzero(digits > 8)
    if retry[0].shape[0]:
        values[retry], bad[retry] = _parse_slow(buf, ends[retry], digits[retry], base)
    if neg is not None:
        bad |= neg & (digits == 0)
        np.negative(values, out=values, where=neg)
    return values, bad


def _describe(line: bytes, sep: str) -> str:
    """Why one line is malformed (only called for the first bad line, so it may be slow)."""
    fields = line.decode("utf-8", "replace").split(sep)
    if len(fields) != NUM_FIELDS:
        kind = "tab" if sep == "\t" else "comma"
        return f"expected {NUM_FIELDS} {kind}-separated fields, found {len(fields)}"
    if fields[0] not in ("0", "1"):
        return f"label must be 0 or 1, found {fields[0]!r}"
    for name, value in zip(DENSE_NAMES, fields[1 : 1 + NUM_DENSE], strict=True):
        body = value[1:] if value.startswith("-") else value
        if value and (not body.isascii() or not body.isdigit() or len(body) > _MAX_DEC_DIGITS):
            return f"{name} is not an integer: {value!r}"
    for name, value in zip(SPARSE_NAMES, fields[1 + NUM_DENSE :], strict=True):
        if value and (len(value) > _MAX_HEX_DIGITS or not set(value) <= _HEX_DIGITS):
            return f"{name} is not a hex id: {value!r}"
        if value and int(value, 16) > MAX_ID:
            return f"{name} is not a 32-bit hex id: {value!r}"
    return "malformed row"


def parse_tsv(
    data: bytes, *, path: str, first_line: int, bad_rows: BadRows = "error"
) -> tuple[Rows, int]:
    """Parse whole TSV lines (``data`` ends with ``\\n``); returns the rows and how many were
    skipped.

    ``first_line`` is the file line number of the first line in ``data`` (for error messages).
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    padded = b"\n" * _PAD + data
    buf = np.frombuffer(padded, dtype=np.uint8)
    words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
    seps = np.flatnonzero((buf == _TAB) | (buf == _NL))[_PAD:]
    is_newline = buf[seps] == _NL
    newline_rank = np.flatnonzero(is_newline)  # index in seps of each line's newline
    n_lines = newline_rank.shape[0]
    if n_lines == 0:
        return Rows.empty(), 0
    wrong = np.diff(newline_rank, prepend=-1) != NUM_FIELDS
    if wrong.any():
        newlines = seps[newline_rank] - _PAD
        first = int(np.flatnonzero(wrong)[0])
        if bad_rows == "error":
            if first:  # a bad value in an earlier line is the first error, whatever the chunking
                start = int(newlines[first - 1]) + 1
                parse_tsv(data[:start], path=path, first_line=first_line, bad_rows="error")
            raise row_error(path, first_line + first, _describe(_line(data, newlines, first), "\t"))
        keep = np.flatnonzero(~wrong)
        good = b"".join(_line(data, newlines, int(i)) + b"\n" for i in keep)
        rows, skipped = parse_tsv(good, path=path, first_line=first_line, bad_rows="skip")
        return rows, skipped + int(wrong.sum())
    ends = seps.reshape(n_lines, NUM_FIELDS)
    lens = (np.diff(seps, prepend=_PAD - 1) - 1).reshape(n_lines, NUM_FIELDS)

    label_char = buf[ends[:, 0] - 1]
    label_ok = (lens[:, 0] == 1) & ((label_char | 1) == ord("1"))
    dense, dense_bad = _parse_numbers(
        buf, words, ends[:, 1 : 1 + NUM_DENSE], lens[:, 1 : 1 + NUM_DENSE], base=10
    )
    sparse_lens = lens[:, 1 + NUM_DENSE :]
    sparse, sparse_bad = _parse_numbers(buf, words, ends[:, 1 + NUM_DENSE :], sparse_lens, base=16)
    sparse_bad |= sparse > MAX_ID
    sparse[sparse_lens == 0] = MISSING_ID
    bad = ~label_ok | dense_bad.any(axis=1) | sparse_bad.any(axis=1)
    rows = Rows((label_char == ord("1")).view(np.uint8), transform_dense(dense), sparse)
    if not bad.any():
        return rows, 0
    first = int(np.flatnonzero(bad)[0])
    if bad_rows == "error":
        newlines = seps[newline_rank] - _PAD
        raise row_error(path, first_line + first, _describe(_line(data, newlines, first), "\t"))
    return rows.select(~bad), int(bad.sum())


def _line(data: bytes, newlines: npt.NDArray[np.intp], i: int) -> bytes:
    start = int(newlines[i - 1]) + 1 if i > 0 else 0
    return data[start : int(newlines[i])]
