"""Vectorised writing of Criteo TSV rows (the inverse of :mod:`.tsv`), for ``dlrm synth``."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .schema import NUM_DENSE, NUM_FIELDS, NUM_SPARSE

_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_MAX_DIGITS = 19


def _decimal_width(x: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    mag = np.abs(x)
    width = np.ones(x.shape, dtype=np.int64)
    bound = np.int64(10)
    for _ in range(_MAX_DIGITS - 1):
        width += mag >= bound
        if not (mag >= bound).any():
            break
        bound = bound * 10
    return width + (x < 0)


def format_tsv(
    labels: npt.NDArray[np.integer],
    dense: npt.NDArray[np.int64],
    dense_missing: npt.NDArray[np.bool_],
    sparse: npt.NDArray[np.integer],
    sparse_missing: npt.NDArray[np.bool_],
) -> bytes:
    """Rows as Criteo TSV: label, 13 integers (empty where missing), 26 8-digit hex ids (empty where
    missing), tab-separated, one ``\\n``-terminated line each."""
    n = labels.shape[0]
    if n == 0:
        return b""
    dense_len = np.where(dense_missing, 0, _decimal_width(dense))
    sparse_len = np.where(sparse_missing, 0, 8)
    field_len = np.concatenate([np.ones((n, 1), np.int64), dense_len, sparse_len], axis=1)
    row_len = field_len.sum(axis=1) + NUM_FIELDS  # 39 tabs and one newline
    row_end = np.cumsum(row_len)
    row_start = row_end - row_len
    buf = np.full(int(row_end[-1]), ord("\t"), dtype=np.uint8)
    buf[row_end - 1] = ord("\n")
    # field f of row r starts at row_start[r] + sum_{f' < f} (len[f'] + 1)
    starts = row_start[:, None] + np.cumsum(field_len + 1, axis=1) - (field_len + 1)
    buf[starts[:, 0]] = np.where(labels > 0, ord("1"), ord("0"))
    d_start = starts[:, 1 : 1 + NUM_DENSE]
    d_end = d_start + dense_len
    neg = (dense < 0) & ~dense_missing
    buf[d_start[neg]] = ord("-")
    mag = np.abs(dense)
    for k in range(int(dense_len.max(initial=0))):
        has = (dense_len - neg) > k
        buf[(d_end - 1 - k)[has]] = ord("0") + (mag[has] // 10**k) % 10
    s_start = starts[:, 1 + NUM_DENSE :]
    present = ~sparse_missing
    values = sparse.astype(np.uint64)
    for m in range(8):
        nibble = (values >> np.uint64(4 * (7 - m))) & np.uint64(15)
        buf[(s_start + m)[present]] = _HEX_CHARS[nibble[present].astype(np.intp)]
    assert sparse.shape[1] == NUM_SPARSE
    return buf.tobytes()
