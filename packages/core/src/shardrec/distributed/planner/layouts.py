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
from shardrec.distributed.planner.types import PlannerTable
from shardrec.distributed.sharding_plan import even_splits
from shardrec.distributed.types import ShardingType, ShardRect

# Narrowest column slice by default: 8 fp32 columns are 32 bytes, one sector of GPU memory; a
# narrower slice reads no fewer bytes per row, so it would only multiply the ids sent.
DEFAULT_MIN_COLUMN_PARTITION: Final = 8
COLUMN_ALIGNMENT: Final = 4


class Traffic(StrEnum):
    """What a shard receives and sends each step; the estimators price it.

    - ``ALL_IDS``: every id of the table's features from every rank; sends back its columns of the
      pooled output (table-wise, column-wise, table-column-wise).
    - ``ROW_SPLIT``: the ids that fall in its rows; sends back partial sums over all its columns
      that are reduced across shards (row-wise).
    - ``HOST_ROW_SPLIT``: like ``ROW_SPLIT`` over the ranks of one host, whose partial sums are
      reduced inside the host first, so each pooled row crosses hosts once (table-row-wise; grid,
      where each column slice is such a table over its columns).
    - ``REPLICATED``: only local ids, no output exchange; gradients are all-reduced (data-parallel).
    """

    ALL_IDS = "all_ids"
    ROW_SPLIT = "row_split"
    HOST_ROW_SPLIT = "host_row_split"
    REPLICATED = "replicated"


@dataclass(frozen=True, slots=True)
class Cut:
    """One candidate cut of a table. ``ranks`` is None when the partitioner chooses the ranks.

    With ``one_host`` the partitioner chooses one host for all pieces; with ``host_groups`` (a
    group number per piece) one host per group. Either way a group's pieces go to distinct ranks of
    its host, and no rank gets two pieces of the table.
    """

    # Each piece is (row_offset, col_offset, rows, cols), the fields of a ShardRect in its order
    # (see rects()).
    pieces: tuple[tuple[int, int, int, int], ...]
    traffic: Traffic
    ranks: tuple[int, ...] | None
    note: str = ""
    one_host: bool = False
    host_groups: tuple[int, ...] | None = None

    def groups(self) -> tuple[int, ...]:
        """The host group of each piece; () when the partitioner places pieces one by one."""
        if self.host_groups is not None:
            if len(self.host_groups) != len(self.pieces):
                raise ValueError(
                    f"Cut.host_groups has {len(self.host_groups)} entries for "
                    f"{len(self.pieces)} pieces"
                )
            return self.host_groups
        return (0,) * len(self.pieces) if self.one_host else ()

    def rects(self) -> tuple[ShardRect, ...]:
        """The pieces as :class:`~shardrec.distributed.types.ShardRect`."""
        return tuple(ShardRect(*piece) for piece in self.pieces)


@runtime_checkable
class ShardLayout(Protocol):
    """Cuts a table for one sharding type; may offer several cuts (e.g. different column widths)."""

    def cuts(
        self, table: PlannerTable, topology: Topology, min_partition: int
    ) -> Sequence[Cut]: ...


class TableWiseLayout:
    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
        return [Cut(((0, 0, table.num_embeddings, table.embedding_dim),), Traffic.ALL_IDS, None)]


class RowWiseLayout:
    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
        w = topology.world_size
        pieces = tuple(
            (off, 0, size, table.embedding_dim)
            for off, size in even_splits(table.num_embeddings, w)
        )
        return [Cut(pieces, Traffic.ROW_SPLIT, tuple(range(w)))]


def _row_blocks(rows: int, ranks: int) -> list[tuple[int, int]]:
    """``rows`` split evenly into at most ``ranks`` blocks, none empty (a block per rank)."""
    return [(off, size) for off, size in even_splits(rows, ranks) if size]


class TableRowWiseLayout:
    """Rows split across the ranks of one host; the partitioner chooses the host."""

    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
        pieces = tuple(
            (off, 0, size, table.embedding_dim)
            for off, size in _row_blocks(table.num_embeddings, topology.ranks_per_host)
        )
        return [Cut(pieces, Traffic.HOST_ROW_SPLIT, None, one_host=True)]


def column_slices(dim: int, most: int, min_partition: int) -> list[list[tuple[int, int]]]:
    """Every split of ``dim`` columns into k = 2, 4, 8, ... slices, k up to ``most``, while each
    slice keeps at least ``min_partition`` columns; as (col_offset, cols) lists.

    Where the dimension is a multiple of 4, slices are too (the FBGEMM kernels want that).
    """
    unit = COLUMN_ALIGNMENT if dim % COLUMN_ALIGNMENT == 0 else 1
    out: list[list[tuple[int, int]]] = []
    k = 2
    while k <= most and dim // k >= min_partition and dim // unit >= k:
        out.append([(off * unit, size * unit) for off, size in even_splits(dim // unit, k)])
        k *= 2
    return out


class ColumnWiseLayout:
    """One cut per shard count k = 2, 4, 8, ... up to the world size while each shard keeps at least
    ``min_partition`` columns; the search prices every k and keeps the one that pays."""

    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
        return [
            Cut(
                tuple((0, c0, table.num_embeddings, cols) for c0, cols in slices),
                Traffic.ALL_IDS,
                None,
                note=f"{len(slices)} column shards",
            )
            for slices in column_slices(table.embedding_dim, topology.world_size, min_partition)
        ]


class TableColumnWiseLayout:
    """Column slices across the ranks of one host (k = 2, 4, ... up to the host's ranks), the
    partitioner choosing the host and which of its ranks: column-wise's traffic with the slices of
    a table side by side on one host (``shardrec_sharders.table_column_wise``)."""

    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
        return [
            Cut(
                tuple((0, c0, table.num_embeddings, cols) for c0, cols in slices),
                Traffic.ALL_IDS,
                None,
                note=f"{len(slices)} column shards on one host",
                one_host=True,
            )
            for slices in column_slices(table.embedding_dim, topology.ranks_per_host, min_partition)
        ]


class GridLayout:
    """Column slices (k = 2, 4, ... up to the number of hosts), each on a host of its own and split
    there by rows across the host's ranks (``shardrec_sharders.grid``): each slice is table-row-wise
    over its columns. It spreads a table wider than one host can serve over several, paying each id
    once per slice."""

    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
        hosts = topology.world_size // topology.ranks_per_host
        blocks = _row_blocks(table.num_embeddings, topology.ranks_per_host)
        out: list[Cut] = []
        for slices in column_slices(table.embedding_dim, hosts, min_partition):
            pieces = tuple((r0, c0, rows, cols) for c0, cols in slices for r0, rows in blocks)
            groups = tuple(g for g in range(len(slices)) for _ in blocks)
            out.append(
                Cut(
                    pieces,
                    Traffic.HOST_ROW_SPLIT,
                    None,
                    note=f"{len(slices)} column slices, one host each",
                    host_groups=groups,
                )
            )
        return out


class DataParallelLayout:
    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
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
        ShardingType.TABLE_COLUMN_WISE: TableColumnWiseLayout(),
        ShardingType.GRID_SHARD: GridLayout(),
    }
