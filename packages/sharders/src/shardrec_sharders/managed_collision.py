"""Sharded managed-collision modules: each raw id remapped by the rank that owns its bucket, then
the embedding module's own sharding.

A :class:`~shardrec.modules.mc_embedding_modules.ManagedCollisionEmbeddingBagCollection` (or
``...EmbeddingCollection``) is sharded in two layers::

    rank r's KJT of raw ids
      │ each managed table's ids split by bucket, sent to the buckets' owners (all-to-all)
      ▼
    owner: one step of each of its buckets on the ids every rank sent (the global batch's ids of
    that bucket); rows sent back (all-to-all); evicted rows and counters shared (all-reduce,
    all-gather)
      │ rank r resets the evicted rows its shards hold
      ▼
    the inner EBC / EC, sharded by the built-in sharders (any mix of their sharding types):
    input dist (rows to the ranks that own them), lookup, output dist

A bucket's step is a function of its state and of the multiset of its ids, and every bucket is
stepped once per step (also on no ids), so the sharded module equals the unsharded module with
the same buckets trained on the global batch: the same id-to-row maps, admissions, evictions,
counters, and (from the shared reset stream, drawn for the evicted rows of all buckets in row
order) the same fresh weights, of which each rank writes the rectangles its shards hold. Each rank
holds the maps of its buckets only (:mod:`shardrec_sharders.managed_buckets`); a checkpoint holds
every bucket under the unsharded module's keys and loads at any world size or plan. A module whose
maps were built on the meta device (only their settings) is sharded with each rank building its
own buckets empty on its device, so no rank ever holds the whole maps.

The module is a :class:`~shardrec.distributed.types.PipelinableModule`: ``input_dist`` is the
routing only (each id to its bucket's owner, by the fixed layout: no state read or changed), so a
training pipeline sends batch i+1's ids during step i; ``compute_and_output_dist`` (and
``compute_and_start_output_dist``, which leaves the inner module's output distribution in flight)
is the rest, run in the batch's own step: the remapping changes the maps and resets evicted rows,
which must come after the previous batch's update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import torch
import torch.distributed as dist
from torch import nn

from shardrec.distributed.async_comm import TensorAwaitable
from shardrec.distributed.awaitables import Mapped, Ready
from shardrec.distributed.hookspecs import RegisterSharder, hookimpl
from shardrec.distributed.model_parallel import ShardedModuleGroup, shard_module
from shardrec.distributed.planner import RankState
from shardrec.distributed.plugins import load_sharder_registry
from shardrec.distributed.sharding import (
    AsyncOutputModule,
    ModuleSharder,
    ShardedEmbeddingModule,
)
from shardrec.distributed.types import (
    Awaitable,
    ParameterSharding,
    PipelinableModule,
    ShardingEnv,
    ShardingType,
)
from shardrec.modules import BadBatchError, EmbeddingBagCollection, EmbeddingCollection
from shardrec.modules.managed_collision import ManagedTableStats
from shardrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
    fresh_rows,
)
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from shardrec_sharders.managed_buckets import (
    LocalIds,
    RoutedIds,
    ShardedManagedCollisionCollection,
)

__all__ = [
    "ManagedCollisionSharder",
    "ManagedOutput",
    "RoutedFeatures",
    "ShardedManagedCollisionEmbeddings",
]

ManagedModule = ManagedCollisionEmbeddingBagCollection | ManagedCollisionEmbeddingCollection

# The inner module's sharding types, as the built-in sharders offer them (static: the registry
# asks for them while plugins are still loading).
_BAG_TYPES: Final[tuple[str, ...]] = tuple(t.value for t in ShardingType)
_SEQUENCE_TYPES: Final[tuple[str, ...]] = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)
_INNER: Final[dict[type[nn.Module], type[nn.Module]]] = {
    ManagedCollisionEmbeddingBagCollection: EmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection: EmbeddingCollection,
}

ManagedOutput = tuple[KeyedTensor | dict[str, JaggedTensor], KeyedJaggedTensor | None]
"""What a managed module returns: the embeddings, and the remapped KJT (or None)."""


@dataclass(frozen=True, slots=True)
class RoutedFeatures:
    """A batch after its input distribution: its KJT of raw ids, and its ids with the owners
    of their buckets (the context of the lookup stage)."""

    features: KeyedJaggedTensor
    routed: RoutedIds


class ShardedManagedCollisionEmbeddings(nn.Module):
    """A managed-collision module on one rank: its buckets of the id maps over the sharded EBC/EC.

    ``forward(KJT of raw ids) -> (embeddings, remapped KJT or None)`` for this rank's batch, as
    the unsharded module returns for it. Every rank must call it, in training and in eval mode
    (ids travel to their buckets' owners); a batch refused on one rank raises
    :class:`BadBatchError` on every rank.
    """

    _reset_rng_state: torch.Tensor

    @property
    def _pg(self) -> dist.ProcessGroup | None:
        return self._env.pg

    def __init__(
        self,
        module: ManagedModule,
        embedding_module: nn.Module,
        env: ShardingEnv,
        device: torch.device,
    ) -> None:
        super().__init__()
        self._device = device
        self._embedding_module = embedding_module
        collection = module.managed_collision_collection
        self._configs = collection.embedding_configs()
        self._managed_collision_collection = ShardedManagedCollisionCollection(
            collection, env.rank, env.world_size, env.pg, device
        )
        layouts = self._managed_collision_collection.bucket_layouts().values()
        self._num_buckets = sum(layout.num_buckets for layout in layouts)
        self._return_remapped_features = module.return_remapped_features
        # A meta module (built to be sharded) holds no stream state: it is the seeded one it was
        # built with.
        rng_state = module.reset_rng_state
        self.register_buffer(
            "_reset_rng_state",
            module.initial_reset_rng_state() if rng_state.is_meta else rng_state.clone(),
        )
        self._env = env  # its group is held weakly (shardrec.distributed.group_ref)
        self._rank = env.rank
        self._world_size = env.world_size

    @property
    def embedding_module(self) -> nn.Module:
        """The sharded EBC / EC that looks the remapped rows up."""
        return self._embedding_module

    @property
    def managed_collision_collection(self) -> ShardedManagedCollisionCollection:
        """This rank's buckets of the id maps."""
        return self._managed_collision_collection

    def stats(self) -> dict[str, ManagedTableStats]:
        """Per table, the counters of the whole (global) table: every rank holds the same."""
        return self._managed_collision_collection.stats()

    def forward(self, features: KeyedJaggedTensor) -> ManagedOutput:
        return self.compute_and_output_dist(self.input_dist(features).wait())

    # ---- the pipeline's split (PipelinableModule, AsyncOutputModule) --------------------------

    def input_dist(self, features: KeyedJaggedTensor) -> Awaitable[RoutedFeatures]:
        """The stateless part of a step: each id sent to the owner of its bucket (the layout
        alone decides where), reading and changing no map, row or counter. Returns with the
        exchange of the per-bucket counts (and of the bad-batch flag) in flight; ``advance()``
        issues the ids' all-to-all; ``wait()`` raises :class:`BadBatchError` on every rank when
        any rank's batch was refused."""
        local, problem = self._local_ids(features)
        counts = local.counts if local is not None else [0] * self._num_buckets
        pending = self._start_gather_counts([0 if problem is None else 1, *counts])
        mcc = self._managed_collision_collection
        return _RoutingIds(features, local, problem, pending, mcc, self._rank)

    def compute_and_output_dist(self, ctx: RoutedFeatures) -> ManagedOutput:
        """The stateful part: remap (admissions, evictions, evicted rows reset), then the inner
        EBC / EC's own forward on the rows (its input dist, lookup, output dist)."""
        remapped = self._remap_routed(ctx)
        out = self._embedding_module(remapped)
        return out, remapped if self._return_remapped_features else None

    def compute_and_start_output_dist(self, ctx: RoutedFeatures) -> Awaitable[ManagedOutput]:
        """:meth:`compute_and_output_dist` with the inner module's output distribution left in
        flight (when the inner module can; otherwise it runs whole). The remapping and the inner
        module's input distribution run here, blocking: they need the rows this step decides."""
        remapped = self._remap_routed(ctx)
        inner = self._embedding_module
        pending: Awaitable[KeyedTensor | dict[str, JaggedTensor]]
        # A plugin sharder's module may lack the split; a module split between sharders has it
        # only when every part has.
        parts_lack = isinstance(inner, ShardedModuleGroup) and bool(inner.parts_not_pipelinable())
        if (
            not parts_lack
            and isinstance(inner, PipelinableModule)
            and isinstance(inner, AsyncOutputModule)
        ):
            pending = inner.compute_and_start_output_dist(inner.input_dist(remapped).wait())
        else:
            pending = Ready(inner(remapped))
        kept = remapped if self._return_remapped_features else None
        return Mapped(pending, lambda out: (out, kept))

    # ---- one step's remapping -----------------------------------------------------------------

    def _remap_routed(self, ctx: RoutedFeatures) -> KeyedJaggedTensor:
        mcc = self._managed_collision_collection
        result = mcc.remap_routed(ctx.routed)
        if self.training:
            self._reset(result.evicted)
        return mcc.with_rows(ctx.features, result.rows)

    def _local_ids(self, features: object) -> tuple[LocalIds | None, str | None]:
        """This rank's ids by bucket, or None and why the batch is refused (before any
        collective, so that the other ranks hear of it instead of waiting)."""
        if not isinstance(features, KeyedJaggedTensor):
            return None, f"expected a KeyedJaggedTensor, got {type(features).__name__}"
        dtype = features.values().dtype
        if dtype not in (torch.int64, torch.int32):
            return None, f"managed ids must be int64 or int32, got {dtype}"
        mcc = self._managed_collision_collection
        try:
            return mcc.split(mcc.table_ids(features)), None
        except (ValueError, TypeError) as exc:
            return None, str(exc)

    def _start_gather_counts(self, mine: list[int]) -> Awaitable[list[list[int]]]:
        """Every rank's ``mine`` (the bad-batch flag, then its ids per bucket), in flight."""
        if self._world_size == 1 or self._pg is None:
            return Ready([mine])
        local = torch.tensor(mine, dtype=torch.int64, device=self._device)
        every = torch.empty((self._world_size, len(mine)), dtype=torch.int64, device=self._device)
        work = dist.all_gather(list(every.unbind(0)), local, group=self._pg, async_op=True)
        assert work is not None
        return Mapped(TensorAwaitable(every, work, local, torch.int64), lambda t: t.tolist())

    def _reset(self, evicted: Mapping[str, torch.Tensor | None]) -> None:
        """Fresh weights and zero optimizer state for the evicted rows this rank's shards hold."""
        fresh = fresh_rows(self._configs, evicted, self._reset_rng_state)
        if not fresh:
            return
        inner = self._embedding_module
        if not isinstance(inner, ShardedEmbeddingModule):
            raise TypeError(
                f"{type(inner).__name__} has no local_table_shards(): evicted rows cannot be reset"
            )
        held = inner.local_table_shards()
        with torch.no_grad():
            for table, block in fresh.items():
                shards = held.get(table)
                rows = evicted[table]
                if shards is None or rows is None:
                    continue
                for shard in shards.weight:
                    r0, c0 = shard.offsets[0], shard.offsets[1]
                    n, width = shard.tensor.shape
                    at, local = _rows_within(rows, r0, n, shard.tensor.device)
                    values = block.index_select(0, at.cpu())[:, c0 : c0 + width]
                    shard.tensor.index_copy_(0, local, values.to(shard.tensor))
                for states in shards.optimizer_state.values():
                    for state in states:
                        if state.tensor.dim() == 0:  # Adam's step, shared by the group: kept
                            continue
                        _, local = _rows_within(
                            rows, state.offsets[0], state.tensor.shape[0], state.tensor.device
                        )
                        state.tensor.index_fill_(0, local, 0)


def _rows_within(
    rows: torch.Tensor, first: int, count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in ``rows`` of the rows in ``[first, first + count)``, and those rows made
    local (minus ``first``)."""
    local = rows.to(device) - first
    at = ((local >= 0) & (local < count)).nonzero().squeeze(1)
    return at, local.index_select(0, at)


class _RoutingIds:
    """A batch's ids on their way to their buckets' owners (``input_dist``): the counts'
    exchange in flight, then the ids' all-to-all. Every rank refuses the batch alike when any
    rank flagged its own, before any id moves."""

    def __init__(
        self,
        features: KeyedJaggedTensor,
        local: LocalIds | None,
        problem: str | None,
        counts: Awaitable[list[list[int]]],
        mcc: ShardedManagedCollisionCollection,
        rank: int,
    ) -> None:
        self._features = features
        self._local = local
        self._problem = problem
        self._counts = counts
        self._mcc = mcc
        self._rank = rank
        self._routing: Awaitable[RoutedIds] | None = None
        self._refused: tuple[str, list[int]] | None = None

    def advance(self) -> None:
        """Wait for every rank's counts (the one host read) and issue the ids' all-to-all."""
        if self._routing is not None or self._refused is not None:
            return
        every = self._counts.wait()
        bad = [r for r, row in enumerate(every) if row[0] != 0]
        if bad:
            here = f"rank {self._rank}: {self._problem}" if self._problem is not None else None
            why = here or f"managed ids: the batch of rank(s) {bad} was refused (see their error)"
            self._refused = (why, bad)
            return
        assert self._local is not None
        self._routing = self._mcc.route(self._local, [row[1:] for row in every])

    def wait(self) -> RoutedFeatures:
        self.advance()
        if self._refused is not None:
            why, ranks = self._refused
            raise BadBatchError(why, ranks=ranks)
        assert self._routing is not None
        return RoutedFeatures(self._features, self._routing.wait())


class ManagedCollisionSharder:
    """Shards a managed-collision module: its id maps by bucket, its EBC / EC by the sharders
    of that module type (``sharders``; None: those the ``shardrec`` entry points offer).

    Offers every sharding type the built-in sharders offer for the inner module; one call shards
    the whole module, whatever mix of types its tables are planned with.
    """

    def __init__(
        self, module_type: type[nn.Module], sharders: Sequence[ModuleSharder] | None = None
    ) -> None:
        if module_type not in _INNER:
            raise TypeError(f"ManagedCollisionSharder cannot shard {module_type.__name__}")
        self._module_type = module_type
        self._sharders = list(sharders) if sharders is not None else None

    @property
    def module_type(self) -> type[nn.Module]:
        return self._module_type

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if self._module_type is ManagedCollisionEmbeddingBagCollection:
            return list(_BAG_TYPES)
        return list(_SEQUENCE_TYPES)

    def inner_sharders(self) -> list[ModuleSharder]:
        """The sharders of the inner EBC / EC (loaded from the entry points on first use)."""
        if self._sharders is None:
            self._sharders = list(load_sharder_registry().sharders())
        inner = _INNER[self._module_type]
        return [s for s in self._sharders if s.module_type is inner]

    def _owner(self, sharding_type: str, compute_device_type: str) -> ModuleSharder | None:
        for s in self.inner_sharders():
            if sharding_type in s.sharding_types(compute_device_type):
                return s
        return None

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        owner = self._owner(sharding_type, compute_device_type)
        if owner is None:
            return []
        return list(owner.compute_kernels(sharding_type, compute_device_type))

    def storage_usage(
        self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
    ) -> dict[str, int]:
        for s in self.inner_sharders():
            return dict(s.storage_usage(tensor, compute_device_type, compute_kernel))
        raise ValueError(f"no sharder for {_INNER[self._module_type].__name__} is loaded")

    def planner_rank_state(self, module: nn.Module, world_size: int) -> list[RankState]:
        """The planner's :class:`~shardrec.distributed.planner.HasRankState`: each bucket's id
        map and policy buffers on the rank that will own it (bucket ``g`` of the module's
        buckets, table by table, on rank ``g % world_size``, as ShardedManagedCollisionCollection
        places them), whatever the sharding of the tables' rows."""
        if not isinstance(module, ManagedModule):
            raise TypeError(f"ManagedCollisionSharder cannot shard {type(module).__name__}")
        out: list[RankState] = []
        g = 0
        for table, buckets in module.managed_collision_collection.buckets_by_table().items():
            for bucket in buckets:
                # Sizes from the buffers themselves (a meta module's too): no formula to drift.
                nbytes = sum(b.numel() * b.element_size() for b in bucket.buffers())
                out.append(
                    RankState(table=table, rank=g % world_size, nbytes=nbytes, what="id map")
                )
                g += 1
        return out

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        if not isinstance(module, ManagedCollisionEmbeddingBagCollection) and not isinstance(
            module, ManagedCollisionEmbeddingCollection
        ):
            raise TypeError(f"ManagedCollisionSharder cannot shard {type(module).__name__}")
        tables = [c.name for c in module.managed_collision_collection.embedding_configs()]
        missing = [t for t in tables if t not in params]
        if missing:
            raise ValueError(
                f"a managed module is sharded whole: tables {missing} have no plan (its tables:"
                f" {tables})"
            )
        inner = shard_module(module.embedding_module, params, self.inner_sharders(), env, device)
        return ShardedManagedCollisionEmbeddings(module, inner, env, device)

    def __repr__(self) -> str:
        return f"ManagedCollisionSharder({self._module_type.__name__})"


@hookimpl
def shardrec_register_sharders(register: RegisterSharder) -> None:
    for module_type in _INNER:
        register(ManagedCollisionSharder(module_type))
