"""``open_dataset``: one object over raw or preprocessed Criteo data, cut into splits, read in
batches.

Example (what ``dlrm train`` does)::

    ds = open_dataset("criteo/", num_embeddings_per_feature=sizes)  # raw or preprocessed
    train = ds.split("train")
    for batch in train.batches(2048, rank=rank, world_size=world, seed=seed, epoch=epoch):
        loss = model(batch.dense_features, batch.sparse_features, batch.labels)
    for batch in ds.split("val").batches(2048, rank=rank, world_size=world):  # in order, all rows
        ...

Raw input is parsed into memory when first needed (about 260 bytes per row); run ``dlrm preprocess``
for the full datasets, whose output is memory-mapped and costs no memory up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from .batch import Batch, make_batch
from .errors import DataError
from .layout import PreprocessedMeta, check_values, open_part, read_metadata
from .reader import read_file
from .schema import Rows, parse_num_embeddings
from .sources import Format, Layout, SourceFile, discover
from .splits import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    Segment,
    SplitName,
    check_fractions,
    split_segments,
)
from .tsv import BadRows


class SplitReader(Protocol):
    """What a training run reads from a split: :class:`Split` (one-hot rows) and
    :class:`.multihot.MultiHotSplit` (multi-hot days) both provide it."""

    @property
    def name(self) -> SplitName: ...

    @property
    def segments(self) -> tuple[Segment, ...]: ...

    @property
    def num_rows(self) -> int: ...

    def rows(self, start: int = 0, stop: int | None = None) -> Rows: ...

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int: ...

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> Iterator[Batch]: ...


class Dataset:
    """Criteo rows from one path, as parts (one per source file) with a split rule.

    Attributes: ``path``, ``format`` (``tsv``, ``csv`` or ``preprocessed``), ``layout`` (``kaggle``,
    ``terabyte``, ``files``: which split rule applies, see :mod:`.splits`), ``part_names``,
    ``num_embeddings_per_feature`` (26 table sizes, or None for unhashed ids + 1). ``meta``: the
    already checked metadata of a preprocessed dataset (read from ``path`` when not given).
    """

    def __init__(
        self,
        path: Path,
        format: Literal["tsv", "csv", "preprocessed"],
        layout: Layout,
        part_names: Sequence[str],
        *,
        num_embeddings_per_feature: tuple[int, ...] | None,
        val_fraction: float,
        test_fraction: float,
        sources: Sequence[SourceFile] = (),
        bad_rows: BadRows = "error",
        meta: PreprocessedMeta | None = None,
    ) -> None:
        self.path = path
        self.format = format
        self.layout = layout
        self.part_names = tuple(part_names)
        self.num_embeddings_per_feature = num_embeddings_per_feature
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self._sources = tuple(sources)
        self._bad_rows_mode: BadRows = bad_rows
        self._parts: dict[int, Rows] = {}
        self._sizes: tuple[int, ...] | None = None
        self._meta = meta
        self.bad_rows: dict[str, int] = {}
        """Rows skipped per raw file (``bad_rows="skip"``), filled as files are read."""

    def part(self, index: int) -> Rows:
        """All rows of part ``index`` (a memory map for preprocessed data, whose values are not
        checked here: read through :meth:`checked_rows` or :class:`Split`)."""
        if index not in self._parts:
            if self.format == "preprocessed":
                if self._meta is None:
                    self._meta = read_metadata(self.path)
                self._parts[index] = open_part(self.path, self._meta.parts[index])
            else:
                src = self._sources[index]
                rows, skipped = read_file(src, bad_rows=self._bad_rows_mode)
                self.bad_rows[str(src.path)] = skipped
                self._parts[index] = rows
        return self._parts[index]

    def checked_rows(self, index: int, start: int, stop: int) -> Rows:
        """Rows ``[start, stop)`` of part ``index``; for preprocessed data, with their values
        checked (:func:`.layout.check_values`: raw rows were checked when parsed)."""
        part = self.part(index)
        rows = Rows(part.labels[start:stop], part.dense[start:stop], part.sparse[start:stop])
        if self._meta is not None:
            check_values(self.path, self._meta.parts[index], start, rows)
        return rows

    def part_rows(self) -> tuple[int, ...]:
        """Row count of every part (reads raw files on first call)."""
        if self._sizes is None:
            self._sizes = tuple(len(self.part(i)) for i in range(len(self.part_names)))
        return self._sizes

    @property
    def num_rows(self) -> int:
        return sum(self.part_rows())

    def split(self, name: SplitName) -> Split:
        """The ``train``, ``val`` or ``test`` rows (disjoint from each other)."""
        segments = split_segments(
            self.layout,
            self.part_rows(),
            name,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
        )
        return Split(self, name, segments)


class Split:
    """The rows of one split, read in deterministic, per-rank disjoint batches."""

    def __init__(self, dataset: Dataset, name: SplitName, segments: Sequence[Segment]) -> None:
        self.dataset = dataset
        self.name = name
        self.segments = tuple(segments)
        self._offsets = np.cumsum([0, *(s.rows for s in self.segments)])

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    def rows(self, start: int = 0, stop: int | None = None) -> Rows:
        """Rows ``[start, stop)`` of the split (not hashed, dense already transformed); a value a
        preprocessed file should not hold is a :class:`DataError` naming its file and row."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        pieces = []
        for seg, offset in zip(self.segments, self._offsets[:-1], strict=True):
            lo, hi = max(start, int(offset)), min(stop, int(offset) + seg.rows)
            if lo < hi:
                a, b = seg.start + lo - int(offset), seg.start + hi - int(offset)
                pieces.append(self.dataset.checked_rows(seg.part, a, b))
        return Rows.concat(pieces) if pieces else Rows.empty()

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank gets per epoch (the same on every rank)."""
        _check_batching(batch_size, 0, world_size)
        full, rest = divmod(self.num_rows, batch_size * world_size)
        return full + (1 if rest and not drop_last else 0)

    def batch_ranges(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
    ) -> list[tuple[int, int]]:
        """Row ranges ``[lo, hi)`` of the split that ``batches`` reads for this rank, in order.

        A global batch is ``batch_size * world_size`` consecutive rows; rank r takes its r-th slice.
        With ``shuffle`` (default: train only) the order of the global batches is a permutation
        drawn from ``(seed, epoch)``. A last, partial global batch is dropped with ``drop_last``,
        else divided as evenly as possible (sizes differ by at most one row; a rank may get an empty
        batch, so that every rank yields the same number of batches and every row is read exactly
        once over all ranks).
        """
        return rank_batch_ranges(
            self.num_rows,
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            epoch=epoch,
            shuffle=self.name == "train" if shuffle is None else shuffle,
            drop_last=drop_last,
        )

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> Iterator[Batch]:
        """This rank's batches of one epoch (see :meth:`batch_ranges` for the order).

        The same arguments give the same batches, so a resumed run passes the epoch and the number
        of batches already done as ``start_batch`` and sees the data it would have seen.
        """
        ranges = self.batch_ranges(
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        sizes = self.dataset.num_embeddings_per_feature
        for lo, hi in ranges[start_batch:]:
            yield make_batch(self.rows(lo, hi), sizes)


def rank_batch_ranges(
    num_rows: int,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_last: bool,
) -> list[tuple[int, int]]:
    """The row ranges of ``num_rows`` rows that rank ``rank`` reads in one epoch (the rule is
    described in :meth:`Split.batch_ranges`; every split-like reader shares it)."""
    _check_batching(batch_size, rank, world_size)
    g = batch_size * world_size
    full, rest = divmod(num_rows, g)
    order = np.arange(full)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(full)
    ranges = [(int(k) * g + rank * batch_size, int(k) * g + (rank + 1) * batch_size) for k in order]
    if rest and not drop_last:
        base, extra = divmod(rest, world_size)
        lo = full * g + rank * base + min(rank, extra)
        ranges.append((lo, lo + base + (1 if rank < extra else 0)))
    return ranges


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def open_dataset(
    path: str | os.PathLike[str],
    *,
    format: Format = "auto",
    num_embeddings: int | None = None,
    num_embeddings_per_feature: Sequence[int] | str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    bad_rows: BadRows = "error",
) -> Dataset:
    """Open raw (TSV/CSV, plain or gzip, file or directory) or preprocessed Criteo data.

    ``format`` (``auto``, ``tsv``, ``csv``, ``preprocessed``) overrides detection.
    ``num_embeddings`` (one size for all) or ``num_embeddings_per_feature`` (26 sizes, or their
    comma-separated string) set the hashing of ids to table rows. ``val_fraction``/``test_fraction``
    apply to the ``files`` layout only. ``bad_rows`` ``"skip"`` drops malformed raw rows and counts
    them in ``Dataset.bad_rows``. Errors: :class:`DataError`.
    """
    sizes = parse_num_embeddings(num_embeddings, num_embeddings_per_feature)
    check_fractions(val_fraction, test_fraction)
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    found = discover(path, format)
    if found.format == "preprocessed":
        meta = read_metadata(found.root)
        if not meta.complete:
            raise DataError(
                f"{found.root}: preprocessing did not finish (run `dlrm preprocess` again)"
            )
        dataset = Dataset(
            found.root,
            "preprocessed",
            meta.layout,
            [p.name for p in meta.parts],
            num_embeddings_per_feature=sizes,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            meta=meta,
        )
        for i in range(len(meta.parts)):
            dataset.part(i)  # checks every file against the metadata now, not mid-training
        return dataset
    return Dataset(
        found.root,
        found.format,
        found.layout,
        [f.part for f in found.files],
        num_embeddings_per_feature=sizes,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        sources=found.files,
        bad_rows=bad_rows,
    )
