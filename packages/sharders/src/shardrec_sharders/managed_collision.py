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
every bucket under the unsharded module's keys and loads at any world size or plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import torch
import torch.distributed as dist
from torch import nn

from shardrec.distributed.hookspecs import RegisterSharder, hookimpl
from shardrec.distributed.model_parallel import shard_module
from shardrec.distributed.plugins import load_sharder_registry
from shardrec.distributed.sharding import ModuleSharder, ShardedEmbeddingModule
from shardrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from shardrec.modules import BadBatchError, EmbeddingBagCollection, EmbeddingCollection
from shardrec.modules.managed_collision import ManagedTableStats
from shardrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
    fresh_rows,
)
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from shardrec_sharders.managed_buckets import LocalIds, ShardedManagedCollisionCollection

__all__ = ["ManagedCollisionSharder", "ShardedManagedCollisionEmbeddings"]

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
        self._return_remapped_features = module.return_remapped_features
        self.register_buffer("_reset_rng_state", module.reset_rng_state.clone())
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

    def forward(
        self, features: KeyedJaggedTensor
    ) -> tuple[KeyedTensor | dict[str, JaggedTensor], KeyedJaggedTensor | None]:
        remapped = self._remap(features)
        out = self._embedding_module(remapped)
        return out, remapped if self._return_remapped_features else None

    # ---- one step's remapping -----------------------------------------------------------------

    def _remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        mcc = self._managed_collision_collection
        local, problem = self._local_ids(features)
        counts = (
            local.counts
            if local is not None
            else [0] * sum(layout.num_buckets for layout in mcc.bucket_layouts().values())
        )
        every = self._gather_counts([0 if problem is None else 1, *counts])
        bad = [r for r, row in enumerate(every) if row[0] != 0]
        if bad:
            here = f"rank {self._rank}: {problem}" if problem is not None else None
            raise BadBatchError(
                here or f"managed ids: the batch of rank(s) {bad} was refused (see their error)",
                ranks=bad,
            )
        assert local is not None
        result = mcc.remap(local, [row[1:] for row in every])
        if self.training:
            self._reset(result.evicted)
        return mcc.with_rows(features, result.rows)

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

    def _gather_counts(self, mine: list[int]) -> list[list[int]]:
        if self._world_size == 1 or self._pg is None:
            return [mine]
        local = torch.tensor(mine, dtype=torch.int64, device=self._device)
        out = [torch.empty_like(local) for _ in range(self._world_size)]
        dist.all_gather(out, local, group=self._pg)
        return [t.tolist() for t in out]

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
