"""How each sharding type cuts a table into shards, and which traffic pattern the shards cause.

The built-in sharding types have layouts here. A plugin that registers its own sharding type can
give the planner its layout: a sharder with a method ``planner_layout(sharding_type) -> ShardLayout
| None`` is asked for it. A sharding type with no layout is estimated as one whole-table shard that
the partitioner places.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol, runtime_checkable

from shardrec.distributed.planner.topology import Topology
from shardrec.distributed.planner.types import TableSpec
from shardrec.distributed.sharding_plan import even_splits
from shardrec.distributed.types import ShardingType, ShardRect

# Narrowest column slice by default: 8 fp32 columns are 32 bytes, one sector of GPU memory; a
# narrower slice reads no fewer bytes per row, so it would only multiply the ids sent.
DEFAULT_MIN_COLUMN_PARTITION: Final = 8
COLUMN_ALIGNMENT: Final = 4


class Traffic(StrEnum):
    """What a shard receives and sends each step; the estimators price it.

    - ``ALL_IDS``: every id of the table's features from every rank; sends back its columns of the
      pooled output (table-wise, column-wise).
    - ``ROW_SPLIT``: the ids that fall in its rows; sends back partial sums over all its columns
      that are reduced across shards (row-wise).
    - ``HOST_ROW_SPLIT``: like ``ROW_SPLIT`` over the ranks of one host, whose partial sums are
      reduced inside the host first, so each pooled row crosses hosts once (table-row-wise).
    - ``REPLICATED``: only local ids, no output exchange; gradients are all-reduced (data-parallel).
    """

    ALL_IDS = "all_ids"
    ROW_SPLIT = "row_split"
    HOST_ROW_SPLIT = "host_row_split"
    REPLICATED = "replicated"


@dataclass(frozen=True, slots=True)
class Cut:
    """One candidate cut of a table. ``ranks`` is None when the partitioner chooses the ranks;
    with ``one_host`` the partitioner chooses a host and piece i goes to its local rank i."""

    # Each piece is (row_offset, col_offset, rows, cols), the fields of a ShardRect in its order
    # (see rects()).
    pieces: tuple[tuple[int, int, int, int], ...]
    traffic: Traffic
    ranks: tuple[int, ...] | None
    note: str = ""
    one_host: bool = False

    def rects(self) -> tuple[ShardRect, ...]:
        """The pieces as :class:`~shardrec.distributed.types.ShardRect`."""
        return tuple(ShardRect(*piece) for piece in self.pieces)


@runtime_checkable
class ShardLayout(Protocol):
    """Cuts a table for one sharding type; may offer several cuts (e.g. different column widths)."""

    def cuts(self, table: TableSpec, topology: Topology, min_partition: int) -> Sequence[Cut]: ...


class TableWiseLayout:
    def cuts(self, table: TableSpec, topology: Topology, min_partition: int) -> Sequence[Cut]:
        return [Cut(((0, 0, table.num_embeddings, table.embedding_dim),), Traffic.ALL_IDS, None)]


class RowWiseLayout:
    def cuts(self, table: TableSpec, topology: Topology, min_partition: int) -> Sequence[Cut]:
        w = topology.world_size
        pieces = tuple(
            (off, 0, size, table.embedding_dim)
            for off, size in even_splits(table.num_embeddings, w)
        )
        return [Cut(pieces, Traffic.ROW_SPLIT, tuple(range(w)))]


class TableRowWiseLayout:
    """Rows split across the ranks of one host; the partitioner chooses the host."""

    def cuts(self, table: TableSpec, topology: Topology, min_partition: int) -> Sequence[Cut]:
        local = topology.ranks_per_host
        pieces = tuple(
            (off, 0, size, table.embedding_dim)
            for off, size in even_splits(table.num_embeddings, local)
        )
        return [Cut(pieces, Traffic.HOST_ROW_SPLIT, None, one_host=True)]


class ColumnWiseLayout:
    """One cut per shard count k = 2, 4, 8, ... up to the world size while each shard keeps at least
    ``min_partition`` columns; the search prices every k and keeps the one that pays.

    Where the dimension is a multiple of 4, slices are too (the FBGEMM kernels want that).
    """

    def cuts(self, table: TableSpec, topology: Topology, min_partition: int) -> Sequence[Cut]:
        dim = table.embedding_dim
        unit = COLUMN_ALIGNMENT if dim % COLUMN_ALIGNMENT == 0 else 1
        out: list[Cut] = []
        k = 2
        while k <= topology.world_size and dim // k >= min_partition and dim // unit >= k:
            pieces = tuple(
                (0, off * unit, table.num_embeddings, size * unit)
                for off, size in even_splits(dim // unit, k)
            )
            out.append(Cut(pieces, Traffic.ALL_IDS, None, note=f"{k} column shards"))
            k *= 2
        return out


class DataParallelLayout:
    def cuts(self, table: TableSpec, topology: Topology, min_partition: int) -> Sequence[Cut]:
        w = topology.world_size
        pieces = tuple((0, 0, table.num_embeddings, table.embedding_dim) for _ in range(w))
        return [Cut(pieces, Traffic.REPLICATED, tuple(range(w)))]


def builtin_layouts() -> dict[str, ShardLayout]:
    return {
        ShardingType.TABLE_WISE: TableWiseLayout(),
        ShardingType.ROW_WISE: RowWiseLayout(),
        ShardingType.COLUMN_WISE: ColumnWiseLayout(),
        ShardingType.DATA_PARALLEL: DataParallelLayout(),
        ShardingType.TABLE_ROW_WISE: TableRowWiseLayout(),
    }
