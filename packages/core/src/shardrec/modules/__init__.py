"""Embedding modules (TorchRec's names): configs, EmbeddingBagCollection, EmbeddingCollection."""

from shardrec.modules.configs import (
    BaseEmbeddingConfig,
    DataType,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)
from shardrec.modules.embedding_bag_collection import EmbeddingBagCollection
from shardrec.modules.embedding_collection import EmbeddingCollection

__all__ = [
    "BaseEmbeddingConfig",
    "DataType",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "PoolingType",
]
