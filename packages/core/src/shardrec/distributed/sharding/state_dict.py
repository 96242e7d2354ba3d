"""The state-dict mapping: from the pieces a rank holds to the unsharded module's keys.

A sharded module reports, per table, its :class:`~shardrec.distributed.types.TableShards` (views
of the live weights and fused-optimizer states, each with its offsets in the global tensor);
the checkpoints name table ``t`` of the module at ``path`` ``<path>.<prefix>.t.weight``, the key
the unsharded module has::

    LocalTable("t0__c4", "t0", ShardRect(0, 4, 10, 4), (10, 8))
        -> TableShards(weight=[LocalShard(view [10, 4], offsets (0, 4), global (10, 8))],
                       optimizer_state={"momentum1": [LocalShard(view [10], (0,), (10,))]})
        -> "sparse.ebc.embedding_bags.t0.weight"
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from shardrec.distributed.sharding.contract import (
    PooledEmbeddingTables,
    SequenceEmbeddingTables,
    TableKeyPrefixed,
    UnshardedTypeAware,
)
from shardrec.distributed.sharding.geometry import LocalTable
from shardrec.distributed.types import LocalShard, TableShards
from shardrec.kernels import TableBatchedEmbedding

__all__ = ["POOLED_TABLES_KEY", "SEQUENCE_TABLES_KEY", "table_key_prefix", "table_shards"]

POOLED_TABLES_KEY = "embedding_bags"
"""Where an EmbeddingBagCollection keeps its tables (``<module>.embedding_bags.<t>.weight``)."""
SEQUENCE_TABLES_KEY = "embeddings"
"""Where an EmbeddingCollection keeps its tables (``<module>.embeddings.<t>.weight``)."""


def table_shards(
    tbe: TableBatchedEmbedding | None,
    local_tables: Sequence[LocalTable],
    all_tables: Sequence[str],
    *,
    replicated: bool = False,
) -> dict[str, TableShards]:
    """Per global table of ``all_tables``, this rank's weight and optimizer-state shards (views
    of ``tbe``'s storage; a table with no piece here gets empty lists). ``replicated``: every
    rank holds the same full copy (data-parallel)."""
    out = {t: TableShards(weight=[], optimizer_state={}, replicated=replicated) for t in all_tables}
    if tbe is None:
        return out
    weights = tbe.table_weights()
    states = tbe.optimizer_states()
    for lt in local_tables:
        entry = out[lt.table]
        rect, gshape = lt.rect, lt.global_shape
        entry.weight.append(LocalShard(weights[lt.name], rect.offsets, gshape))
        for name, tensor in states[lt.name].items():
            if tensor.dim() == 0:
                # A per-table scalar (Adam's step): every shard holds the same value.
                shard = LocalShard(tensor, (), ())
            elif tensor.dim() == 1:
                shard = LocalShard(tensor, (rect.row_offset,), (gshape[0],))
            else:
                shard = LocalShard(tensor, rect.offsets, gshape)
            entry.optimizer_state.setdefault(name, []).append(shard)
    return out


def table_key_prefix(module: nn.Module) -> str:
    """Where the unsharded module kept the tables of the sharded ``module``: its
    :class:`~shardrec.distributed.sharding.TableKeyPrefixed` prefix, else the one of its
    :class:`~shardrec.distributed.sharding.UnshardedTypeAware` type, else ``"embedding_bags"``."""
    if isinstance(module, TableKeyPrefixed):
        return module.table_key_prefix
    if isinstance(module, UnshardedTypeAware):
        source = module.unsharded_module_type
        if issubclass(source, PooledEmbeddingTables):
            return POOLED_TABLES_KEY
        if issubclass(source, SequenceEmbeddingTables):
            return SEQUENCE_TABLES_KEY
        sequence = "EmbeddingCollection" in source.__name__ and "Bag" not in source.__name__
        return SEQUENCE_TABLES_KEY if sequence else POOLED_TABLES_KEY
    return POOLED_TABLES_KEY
