"""Embedding modules (TorchRec's names): configs, EmbeddingBagCollection, EmbeddingCollection, and
the managed-collision modules that give raw ids rows of their own (``docs/managed_ids.md``)."""

from shardrec.kernels.input_checks import BadBatchError, BatchChecker
from shardrec.modules.configs import (
    BaseEmbeddingConfig,
    DataType,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)
from shardrec.modules.embedding_bag_collection import EmbeddingBagCollection
from shardrec.modules.embedding_collection import EmbeddingCollection
from shardrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from shardrec.modules.mc_modules import (
    CountThresholdAdmission,
    EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    ManagedTableStats,
    MCHManagedCollisionModule,
    TTL_EvictionPolicy,
)

__all__ = [
    "BadBatchError",
    "BaseEmbeddingConfig",
    "BatchChecker",
    "CountThresholdAdmission",
    "DataType",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "EvictionPolicy",
    "LFU_EvictionPolicy",
    "LRU_EvictionPolicy",
    "MCHManagedCollisionModule",
    "ManagedCollisionCollection",
    "ManagedCollisionEmbeddingBagCollection",
    "ManagedCollisionEmbeddingCollection",
    "ManagedTableStats",
    "PoolingType",
    "TTL_EvictionPolicy",
]
