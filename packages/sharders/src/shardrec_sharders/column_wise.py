"""Column-wise sharding: each table is cut into column slices (embedding dimensions), each slice
on one rank.

The stages are table-wise's (see ``table_wise.py``) with a slice standing for a table: the ids of a
feature go to every rank holding a slice of its table, each slice owner returns its columns of
the output, and the receiver lays the slices side by side. A rank may hold several slices of one
table.

With a row-wise Adagrad fused optimizer each slice keeps its own per-row state (the mean of g²
over its columns only), so training differs slightly from the unsharded table; SGD, exact Adagrad
and Adam are exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardrec.distributed.sharding import (
    EmbeddingSharderBase,
    ModuleView,
    ShardMetadata,
    check_full_span,
    check_tiling,
)
from shardrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from shardrec_sharders.table_wise import ColumnSlicedEmbedding


class ColumnWiseSharder(EmbeddingSharderBase):
    """Shards EmbeddingBagCollection / EmbeddingCollection tables into column slices."""

    sharding_type = ShardingType.COLUMN_WISE.value

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        self.check_plan(params, env)
        view = ModuleView.of(module, list(params))
        slices: dict[str, list[ShardMetadata]] = {}
        for table, ps in params.items():
            rows, dim = view.global_shape(table)
            if not ps.shards:
                raise ValueError(f"column-wise table {table!r} needs shard metadata")
            check_full_span(table, "column-wise", ps.shards, axis=0, total=rows)
            slices[table] = check_tiling(
                table, "column-wise", "column slices", ps.shards, axis=1, total=dim
            )
        return ColumnSlicedEmbedding(
            view, slices, env, device, type(module).__name__, qcomms=self.qcomms_of(params)
        )
