"""Table-wise-column-wise sharding: each table lives on one node, cut into column slices across
that node's ranks.

The data flow is column-wise sharding's (``column_wise.py``, which is table-wise's with a slice
standing for a table): every id of a table's features goes to each of its slices' ranks, and each
slice sends its columns of the output back. Keeping a table's slices on one node puts the ids'
copies and the slices' replies on the node's fast links for the ranks of that node, and lets the
planner balance a node's ranks with tables too wide for one of them. With a row-wise Adagrad fused
optimizer each slice keeps its own per-row state, as under column-wise sharding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardrec.distributed.node_groups import NodeLayout
from shardrec.distributed.sharding import (
    EmbeddingSharderBase,
    ModuleView,
    ShardMetadata,
    check_full_span,
    check_tiling,
)
from shardrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from shardrec_sharders.table_wise import ColumnSlicedEmbedding


class TableColumnWiseSharder(EmbeddingSharderBase):
    """Shards EmbeddingBagCollection / EmbeddingCollection tables onto one node each, cut into
    column slices across its ranks.

    ``local_world_size``: ranks per node; None reads the launcher's ``LOCAL_WORLD_SIZE`` (one node
    when it is unset).
    """

    sharding_type = ShardingType.TABLE_COLUMN_WISE

    def __init__(
        self, module_type: type[nn.Module], *, local_world_size: int | None = None
    ) -> None:
        super().__init__(module_type)
        self.local_world_size = local_world_size

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        self.check_plan(params, env)
        view = ModuleView.of(module, list(params))
        layout = NodeLayout.from_env(env.world_size, self.local_world_size)
        slices: dict[str, list[ShardMetadata]] = {}
        for table, ps in params.items():
            rows, dim = view.global_shape(table)
            if not ps.shards:
                raise ValueError(f"{self.sharding_type} table {table!r} needs shard metadata")
            check_full_span(table, self.sharding_type, ps.shards, axis=0, total=rows)
            cuts = check_tiling(
                table, self.sharding_type, "column slices", ps.shards, axis=1, total=dim
            )
            nodes = sorted({layout.node_of(s.rank) for s in ps.shards})
            if len(nodes) != 1:
                raise ValueError(
                    f"{self.sharding_type} table {table!r}: column slices on ranks"
                    f" {list(ps.ranks)} span nodes {nodes}; with {layout.local_world_size} ranks"
                    " per node (LOCAL_WORLD_SIZE) they must share one node"
                )
            slices[table] = cuts
        return ColumnSlicedEmbedding(
            view, slices, env, device, type(module).__name__, qcomms=self.qcomms_of(params)
        )
