"""Shard geometry: which rectangle of which table a rank holds, and checks that a plan's shards
tile their table.

Every shape of a shard here is a :class:`~shardrec.distributed.types.ShardRect` (a rectangle of
the table) or a :class:`~shardrec.distributed.types.ShardMetadata` (a rectangle on a rank), the
same types the planner and the checkpoints use::

    table t: [10, 8]           row-wise on 2 ranks            column-wise on 2 ranks
    +--------+                 +--------+ rows 0-4, rank 0    +----+----+
    |        |                 +--------+ rows 5-9, rank 1    |    |    |  cols 0-3 rank 0,
    +--------+                                                +----+----+  cols 4-7 rank 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from shardrec.distributed.sharding_plan import even_splits
from shardrec.distributed.types import ShardMetadata, ShardRect

__all__ = [
    "LocalTable",
    "check_full_span",
    "check_tiling",
    "even_row_shards",
    "local_tables_of",
]


@dataclass(frozen=True, slots=True)
class LocalTable:
    """One piece of a table that this rank holds: ``rect`` of global table ``table``, whose
    whole weight is ``global_shape`` = (rows, cols). The local kernel knows it as ``name``
    (unique among this rank's pieces, e.g. ``"t0__c4"`` for the slice of ``t0`` from column 4)."""

    name: str
    table: str
    rect: ShardRect
    global_shape: tuple[int, int]

    @staticmethod
    def whole(table: str, rows: int, cols: int) -> LocalTable:
        """All of ``table`` (``rows x cols``), under its own name."""
        return LocalTable(table, table, ShardRect.whole(rows, cols), (rows, cols))


def local_tables_of(
    table: str,
    shards: Sequence[ShardMetadata],
    global_shape: tuple[int, int],
    rank: int,
    *,
    name_by_column: bool,
) -> list[LocalTable]:
    """The pieces of ``shards`` on ``rank``, as :class:`LocalTable`. ``name_by_column``: name a
    piece after its first column (``t0__c4``), for sharders that hold several column slices of a
    table on one rank; else after the table."""
    out: list[LocalTable] = []
    for s in shards:
        if s.rank != rank:
            continue
        rect = s.rect
        name = f"{table}__c{rect.col_offset}" if name_by_column else table
        out.append(LocalTable(name, table, rect, global_shape))
    return out


def even_row_shards(rows: int, cols: int, ranks: Sequence[int]) -> list[ShardMetadata]:
    """Full-width row blocks of a ``rows x cols`` table, one per rank in ``ranks`` order, differing
    by at most one row; empty blocks (more ranks than rows) are dropped."""
    return [
        ShardMetadata((at, 0), (n, cols), rank)
        for rank, (at, n) in zip(ranks, even_splits(rows, len(ranks)), strict=True)
        if n
    ]


def check_tiling(
    table: str,
    sharding: str,
    pieces: str,
    shards: Sequence[ShardMetadata],
    *,
    axis: Literal[0, 1],
    total: int,
) -> list[ShardMetadata]:
    """``shards`` sorted along ``axis`` (0: rows, 1: columns); they must tile ``[0, total)`` there:
    no gap, no overlap, no empty piece. The error names the table and the pieces as
    (offset, size, rank) triples; ``pieces`` says what they are ("row blocks")."""
    ordered = sorted(shards, key=lambda s: (s.offsets[axis], s.sizes[axis], s.rank))
    at = 0
    for s in ordered:
        if s.offsets[axis] != at or s.sizes[axis] < 1:
            break
        at += s.sizes[axis]
    else:
        if at == total:
            return ordered
    cuts = [(s.offsets[axis], s.sizes[axis], s.rank) for s in ordered]
    raise ValueError(
        f"{sharding} table {table!r}: {pieces} (offset, size, rank) {cuts} do not tile [0, {total})"
    )


def check_full_span(
    table: str,
    sharding: str,
    shards: Sequence[ShardMetadata],
    *,
    axis: Literal[0, 1],
    total: int,
) -> None:
    """Every shard spans the whole table along ``axis``: all ``total`` rows (axis 0, a column
    slice) or all ``total`` columns (axis 1, a row block)."""
    for s in shards:
        if s.offsets[axis] != 0 or s.sizes[axis] != total:
            what = f"does not span all {total} rows" if axis == 0 else "is not full width"
            raise ValueError(f"{sharding} table {table!r}: shard {s} {what}")
