"""Grid sharding: each table is cut into column slices, each slice kept on one node and split
there by rows across the node's ranks.

A column slice is a table of its own to table-wise-row-wise sharding (``table_row_wise.py``): its
ids go to the rank of its node whose row block holds them, partial sums are reduce-scattered
inside the node and the finished ones sent across nodes; the receiver lays a table's slices side
by side. A node may hold several slices of one table. With a row-wise Adagrad fused optimizer each
slice keeps its own per-row state (as column-wise sharding does), so training differs slightly
from the unsharded table; SGD, exact Adagrad and Adam are exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardrec.distributed.node_groups import node_groups
from shardrec.distributed.sharding import ModuleView, ShardMetadata, check_tiling
from shardrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from shardrec_sharders.table_row_wise import (
    NodeRowShardedEmbedding,
    NodeRowSharderBase,
    NodeSlice,
    node_row_blocks,
)


class GridSharder(NodeRowSharderBase):
    """Shards EmbeddingBagCollection tables into column slices, one node each, split by rows."""

    sharding_type = ShardingType.GRID_SHARD

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        self.check_plan(params, env)
        view = ModuleView.of(module, list(params))
        groups = node_groups(env, self.local_world_size)
        slices: dict[str, list[NodeSlice]] = {}
        for table, ps in params.items():
            rows, dim = view.global_shape(table)
            if not ps.shards:
                raise ValueError(f"{self.sharding_type} table {table!r} needs shard metadata")
            # Each column slice: the row blocks that share its columns; its first block stands
            # for it in the tiling check of the columns.
            by_columns: dict[tuple[int, int], list[ShardMetadata]] = {}
            for s in ps.shards:
                by_columns.setdefault((s.offsets[1], s.sizes[1]), []).append(s)
            firsts = [min(bl, key=lambda b: b.offsets[0]) for bl in by_columns.values()]
            columns = check_tiling(
                table, self.sharding_type, "column slices", firsts, axis=1, total=dim
            )
            slices[table] = []
            for first in columns:
                c0, nc = first.offsets[1], first.sizes[1]
                blocks, node = node_row_blocks(
                    f"{table}[:, {c0}:{c0 + nc}]",
                    self.sharding_type,
                    [b for b in by_columns[(c0, nc)] if b.sizes[0]],
                    rows,
                    groups.layout,
                )
                slices[table].append(NodeSlice(c0, nc, node, tuple(blocks)))
        kind = f"{type(module).__name__} ({self.sharding_type})"
        return NodeRowShardedEmbedding(
            view, slices, groups, env, device, kind, qcomms=self.qcomms_of(params)
        )
