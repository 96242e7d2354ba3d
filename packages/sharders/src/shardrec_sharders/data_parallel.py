"""Data-parallel sharding: every rank holds a full replica of each table.

    input dist   nothing: each rank looks up its own batch
    lookup       the fused kernel over the replica
    output dist  nothing

Without a fused optimizer (the module's ``fused_params`` name none) the replica's tables are
ordinary parameters with ``.grad``: DistributedModelParallel wraps them in DistributedDataParallel
with the dense layers, so their gradients are all-reduced and the torch optimizer that trains the
dense layers steps them.

With a fused optimizer (SGD, Adagrad, row-wise Adagrad, Adam) the replica is a lookup with a
deferred update: after backward one all-reduce sums every table's gradient and touched rows over
the ranks, and every rank applies the fused optimizer to the rows any rank touched (see
``replica_sync``). Their parameters do not require grad, as under every fused sharding, so DDP
and torch optimizers leave them alone; the replicas stay bit-identical.

The smallest worked example of ``docs/plugins.md``: a ``ShardedModule`` made of the public blocks
of ``shardrec.distributed.sharding`` (``FeatureRouter``, ``BatchGuard``, ``build_local_lookup``,
``table_shards``), whose input dist is only the ranks' agreement on the batch's check.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardrec.distributed.async_comm import start_flagged_ranks
from shardrec.distributed.sharding import (
    POOLED_TABLES_KEY,
    SEQUENCE_TABLES_KEY,
    Awaitable,
    BatchGuard,
    EmbeddingSharderBase,
    FeatureRouter,
    LocalTable,
    Mapped,
    ModuleView,
    Ready,
    build_local_lookup,
    pooled_output,
    sequence_output,
    table_shards,
)
from shardrec.distributed.types import (
    EmbeddingComputeKernel,
    ParameterSharding,
    ShardingEnv,
    ShardingType,
    TableShards,
)
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from shardrec_sharders.replica_sync import ReplicaSync


class ReplicatedEmbedding(nn.Module):
    """A replica of some tables of an EBC/EC: trained by the module's fused optimizer after one
    all-reduce per backward, or (no fused optimizer) through DDP and the dense optimizer."""

    def __init__(self, view: ModuleView, device: torch.device, kind: str, env: ShardingEnv) -> None:
        super().__init__()
        fused = view.optimizer is not None
        #: ReplicatedModule: True hands the tables to DDP and the dense optimizer; a fused
        #: replica syncs itself, so DDP must leave its tables alone.
        self.replicated = not fused
        #: TableKeyPrefixed: where the unsharded module kept these tables.
        self.table_key_prefix = POOLED_TABLES_KEY if view.pooled else SEQUENCE_TABLES_KEY
        self.env = env
        self.guard = BatchGuard.of(view, kind, env)
        self.pooled = view.pooled
        self.need_indices = view.need_indices
        self.pairs = view.pairs
        self.tables = list(view.configs)
        self.router = FeatureRouter([p.source for p in view.pairs], owner=f"{kind} (data_parallel)")
        self.local_tables = [LocalTable.whole(t, *view.global_shape(t)) for t in view.configs]
        lookup = build_local_lookup(
            view,
            self.local_tables,
            [(p.name, p.table) for p in view.pairs],
            pooling_sum=False,
            device=device,
            optimizer=view.optimizer,
            check_inputs=False,  # the guard checks the user's batch
            deferred_update=fused,
        )
        assert lookup is not None
        self.lookup = lookup
        self.sync: ReplicaSync | None = None
        if fused:
            self.sync = ReplicaSync(lookup, env.pg)
            self.sync.broadcast_from_first_rank()

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        return self.compute_and_output_dist(self.input_dist(kjt).wait())

    def input_dist(self, kjt: KeyedJaggedTensor) -> Awaitable[KeyedJaggedTensor]:
        """No ids move: only the ranks' agreement on the batch's check is in flight."""
        routed = self.router.route(kjt)
        if not self.guard.enabled:
            return Mapped(Ready(routed), self._checked_alone)
        # No collective runs in this forward to carry the check's flag: one tiny all-reduce.
        flagged = start_flagged_ranks(self.guard.local_flag(routed), self.env.pg)
        return Mapped(flagged, lambda bad: self._checked(routed, bad))

    def _checked_alone(self, routed: KeyedJaggedTensor) -> KeyedJaggedTensor:
        self.guard.check_alone(routed)
        return routed

    def _checked(self, routed: KeyedJaggedTensor, bad: list[int]) -> KeyedJaggedTensor:
        if bad:
            self.guard.raise_for(routed, bad)
        return routed

    def compute_and_output_dist(
        self, routed: KeyedJaggedTensor
    ) -> KeyedTensor | dict[str, JaggedTensor]:
        out = self.lookup.lookup(
            values=routed.values(),
            offsets=routed.offsets(),
            length_per_feature=routed.length_per_key(),
            batch_size=routed.stride(),
            weights=routed.weights_or_none() if self.lookup.is_weighted else None,
        )
        if self.pooled:
            assert isinstance(out, torch.Tensor)
            return pooled_output(self.pairs, out, routed)
        assert isinstance(out, list)
        return {
            p.name: sequence_output(rows, routed, i, self.need_indices)
            for i, (p, rows) in enumerate(zip(self.pairs, out, strict=True))
        }

    def compute_and_start_output_dist(
        self, routed: KeyedJaggedTensor
    ) -> Awaitable[KeyedTensor | dict[str, JaggedTensor]]:
        """The lookup; no output moves, so the result is ready."""
        return Ready(self.compute_and_output_dist(routed))

    @property
    def check_inputs(self) -> bool:
        """Whether each batch is checked, and the ranks agree on it (one all-reduce)."""
        return self.guard.enabled

    @check_inputs.setter
    def check_inputs(self, enabled: bool) -> None:
        # Set it alike on every rank: the ranks must run the same collectives.
        self.guard.enabled = enabled

    def local_table_shards(self) -> dict[str, TableShards]:
        return table_shards(self.lookup, self.local_tables, self.tables, replicated=True)


class DataParallelSharder(EmbeddingSharderBase):
    """Replicates EmbeddingBagCollection / EmbeddingCollection tables on every rank."""

    sharding_type = ShardingType.DATA_PARALLEL.value
    kernels = (EmbeddingComputeKernel.DENSE.value,)

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        self.check_plan(params, env)
        return ReplicatedEmbedding(
            ModuleView.of(module, list(params)), device, type(module).__name__, env
        )
