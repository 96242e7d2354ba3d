"""Managed tables for the DLRM: Criteo's raw 32-bit ids get rows of their own (no modulo).

``managed_tables(ebc, "lru")`` puts the sparse arch's EmbeddingBagCollection behind a
:class:`~shardrec.modules.mc_embedding_modules.ManagedCollisionEmbeddingBagCollection` (one
``MCHManagedCollisionModule`` per table, eviction every step) and gives back a module that, like
the EBC, maps a KJT of ids to the pooled KeyedTensor; DistributedModelParallel shards the managed
module inside it with the ``managed_collision`` sharder. The batches then carry ``1 + raw id``
(0 for a missing value, which is an id like any other here): ``dlrm train --managed-ids`` opens
the data without hashing. ``--managed-buckets B`` splits every table into ``B`` buckets, which a
sharded model spreads over the ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec.modules.mc_policies import EvictionPolicy, LFU_EvictionPolicy, LRU_EvictionPolicy
from shardrec_dlrm.model.config import ManagedIds

__all__ = ["ManagedEmbeddingBags", "managed_tables"]


class ManagedEmbeddingBags(nn.Module):
    """``KJT of ids (F, B, 1) -> KeyedTensor (B, F * D)`` through managed tables; the counters of
    each table: ``managed.stats()``."""

    def __init__(self, managed: ManagedCollisionEmbeddingBagCollection) -> None:
        super().__init__()
        self.managed = managed

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self.managed.embedding_bag_configs()

    def embedding_names(self) -> list[str]:
        return self.managed.embedding_names()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled: KeyedTensor = self.managed(features)[0]
        return pooled


def _policy(kind: ManagedIds) -> EvictionPolicy:
    if kind == "lru":
        return LRU_EvictionPolicy()
    if kind == "lfu":
        return LFU_EvictionPolicy()
    raise ValueError(f"no eviction policy for managed_ids={kind!r}")


def managed_tables(
    ebc: EmbeddingBagCollection,
    kind: ManagedIds,
    *,
    num_buckets: int = 1,
    device: torch.device | None = None,
) -> ManagedEmbeddingBags:
    """``ebc``'s tables as managed tables with the ``kind`` eviction policy, each split into
    ``num_buckets`` buckets (:mod:`shardrec.modules.mc_buckets`), their id maps on ``device``
    (default CPU; meta for the planner, which needs only their shapes, and for a model to be
    sharded: a map takes tens of bytes a row).

    The maps do not follow ``ebc``'s device. Meta maps can only be sharded: the sharder builds
    each rank's own buckets empty where they live (real maps it moves there, with their state);
    unsharded, a module needs real maps."""
    configs = ebc.embedding_bag_configs()
    mcc = ManagedCollisionCollection(
        {
            c.name: MCHManagedCollisionModule(
                c.num_embeddings, device=device, eviction_policy=_policy(kind), name=c.name
            )
            for c in configs
        },
        configs,
        num_buckets=num_buckets,
    )
    return ManagedEmbeddingBags(ManagedCollisionEmbeddingBagCollection(ebc, mcc))
