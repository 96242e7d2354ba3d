"""Train / validation / test splits that never share a row.

Each split is a list of :class:`Segment` (a row range of one part), in order:

- ``kaggle`` (Kaggle ``train.txt``): the N rows are cut into 7 consecutive parts of ``N // 7`` rows,
  the first ``N % 7`` parts one row longer (as the DLRM reference does); parts 1-6 train; part 7's
  first half (``ceil``) is validation and its second half test.
- ``terabyte`` (``day_0`` .. ``day_K``, K >= 1; the 1TB logs have K = 23): every day but the last
  trains; the last day's first half (``ceil``) is validation, its second half test.
- ``files`` (anything else): the rows of all files, in order; the last ``floor(N * test_fraction)``
  rows are test, the ``floor(N * val_fraction)`` rows before them validation, the rest train.

TorchRec's reference app evaluates Kaggle on the second half of its training file; here validation
and test rows are always disjoint from training rows, which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .sources import Layout

SplitName = Literal["train", "val", "test"]
SPLIT_NAMES: Final = ("train", "val", "test")
DEFAULT_VAL_FRACTION: Final = 0.05
DEFAULT_TEST_FRACTION: Final = 0.05


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows ``[start, stop)`` of part number ``part``."""

    part: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _global_range(sizes: Sequence[int], start: int, stop: int) -> list[Segment]:
    """The rows ``[start, stop)`` of the concatenated parts, as per-part segments."""
    out: list[Segment] = []
    offset = 0
    for i, n in enumerate(sizes):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append(Segment(i, lo - offset, hi - offset))
        offset += n
    return out


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}"
        )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must leave rows to train on, "
            f"got {val_fraction + test_fraction}"
        )


def split_segments(
    layout: Layout,
    sizes: Sequence[int],
    split: SplitName,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> list[Segment]:
    """The segments of ``split`` for parts of the given row counts under ``layout``'s rule."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_NAMES)}")
    total = sum(sizes)
    if layout == "kaggle":
        q, r = divmod(total, 7)
        train_rows = sum(q + (1 if i < r else 0) for i in range(6))
        last = total - train_rows
        bounds = {
            "train": (0, train_rows),
            "val": (train_rows, train_rows + (last + 1) // 2),
            "test": (train_rows + (last + 1) // 2, total),
        }
        return _global_range(sizes, *bounds[split])
    if layout == "terabyte" and len(sizes) >= 2:
        last = len(sizes) - 1
        half = (sizes[last] + 1) // 2
        if split == "train":
            return [Segment(i, 0, n) for i, n in enumerate(sizes[:last]) if n]
        if split == "val":
            return [Segment(last, 0, half)] if half else []
        return [Segment(last, half, sizes[last])] if sizes[last] > half else []
    check_fractions(val_fraction, test_fraction)
    n_test = int(total * test_fraction)
    n_val = int(total * val_fraction)
    n_train = total - n_val - n_test
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, total),
    }
    return _global_range(sizes, *bounds[split])
