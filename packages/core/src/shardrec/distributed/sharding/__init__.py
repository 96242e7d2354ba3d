"""The public contract for sharders and sharded modules, and the building blocks every built-in
sharder is made of (a third party's sharder may use them all).

A sharded embedding module answers one batch in three stages, for ``W`` ranks each passing its
own batch of ``B_s`` samples and ``F`` features::

    input dist    routed = FeatureRouter.route(kjt)          (F, B_s, L): the keys it reads
                  ids -> the ranks that own their rows        bucketize_rows, BatchGuard,
                  (one jagged all-to-all, in flight)         async_comm.start_all_to_all_jagged
                  -> Awaitable[ctx]                          ... .wait() -> Received
    lookup        every sender's ids, stacked along the batch stack_senders -> StackedInput
                  one fused lookup of the local pieces        build_local_lookup, lookup_pooled
                                                              (F', W*B_max, L) -> (W*B_max, D')
    output dist   each sender's rows back to it               pooled_send_buffer,
                  (all-to-all or reduce-scatter, in flight)  sequence_send_buffer,
                                                              async_comm.start_all_to_all_single
                  -> Awaitable[KeyedTensor (B_s, D) or        ... .wait(): divide_mean_bags,
                     dict[str, JaggedTensor] (B_s, L, D)]    pooled_output, sequence_output

The module declares what DistributedModelParallel and the checkpoints ask of it as Protocols
(:class:`ShardedModule`, :class:`TableKeyPrefixed`, :class:`ReplicatedModule`,
:class:`AsyncOutputModule`); a shard is a
:class:`ShardRect` (a :class:`ShardMetadata` on a rank), the one rectangle type of the planner,
the sharders and the checkpoints. ``docs/plugins.md`` walks through a sharder built from these.
"""

from shardrec.distributed.awaitables import AllOf, Mapped, Ready, Then
from shardrec.distributed.sharding.contract import (
    AsyncOutputModule,
    Awaitable,
    HasFusedLookup,
    HasPlannerLayout,
    ModuleSharder,
    NamedEmbeddingOutputs,
    PipelinableModule,
    PooledEmbeddingTables,
    ReplicatedModule,
    SequenceEmbeddingTables,
    ShardedEmbeddingModule,
    ShardedModule,
    TableKeyPrefixed,
    UnshardedTypeAware,
    embedding_tables,
)
from shardrec.distributed.sharding.geometry import (
    LocalTable,
    check_full_span,
    check_tiling,
    even_row_shards,
    local_tables_of,
)
from shardrec.distributed.sharding.input_dist import (
    BatchGuard,
    Received,
    StackedInput,
    bucketize_rows,
    stack_senders,
)
from shardrec.distributed.sharding.lookup import build_local_lookup, lookup_pooled, lookup_sequence
from shardrec.distributed.sharding.module_view import EmbeddingModule, ModuleView, TableFeature
from shardrec.distributed.sharding.output_dist import (
    divide_mean_bags,
    nothing_to_send,
    pooled_output,
    pooled_send_buffer,
    sequence_output,
    sequence_send_buffer,
)
from shardrec.distributed.sharding.sharder import EmbeddingSharderBase, storage_bytes
from shardrec.distributed.sharding.state_dict import (
    POOLED_TABLES_KEY,
    SEQUENCE_TABLES_KEY,
    table_key_prefix,
    table_shards,
)
from shardrec.distributed.sharding.variable_batch import (
    Rect,
    append_key_strides,
    key_strides,
    pack_rects,
    pad_received,
    take_key_strides,
    vbe_recv_sizes,
)
from shardrec.distributed.types import LocalShard, ShardMetadata, ShardRect, TableShards
from shardrec.modules._routing import FeatureRouter

__all__ = [
    "POOLED_TABLES_KEY",
    "SEQUENCE_TABLES_KEY",
    "AllOf",
    "AsyncOutputModule",
    "Awaitable",
    "BatchGuard",
    "EmbeddingModule",
    "EmbeddingSharderBase",
    "FeatureRouter",
    "HasFusedLookup",
    "HasPlannerLayout",
    "LocalShard",
    "LocalTable",
    "Mapped",
    "ModuleSharder",
    "ModuleView",
    "NamedEmbeddingOutputs",
    "PipelinableModule",
    "PooledEmbeddingTables",
    "Ready",
    "Received",
    "Rect",
    "ReplicatedModule",
    "SequenceEmbeddingTables",
    "ShardMetadata",
    "ShardRect",
    "ShardedEmbeddingModule",
    "ShardedModule",
    "StackedInput",
    "TableFeature",
    "TableKeyPrefixed",
    "TableShards",
    "Then",
    "UnshardedTypeAware",
    "append_key_strides",
    "bucketize_rows",
    "build_local_lookup",
    "check_full_span",
    "check_tiling",
    "divide_mean_bags",
    "embedding_tables",
    "even_row_shards",
    "key_strides",
    "local_tables_of",
    "lookup_pooled",
    "lookup_sequence",
    "nothing_to_send",
    "pack_rects",
    "pad_received",
    "pooled_output",
    "pooled_send_buffer",
    "sequence_output",
    "sequence_send_buffer",
    "stack_senders",
    "storage_bytes",
    "table_key_prefix",
    "table_shards",
    "take_key_strides",
    "vbe_recv_sizes",
]
