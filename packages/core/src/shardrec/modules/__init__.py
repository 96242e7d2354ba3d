"""Embedding modules (TorchRec's names): configs, EmbeddingBagCollection, EmbeddingCollection."""

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

__all__ = [
    "BadBatchError",
    "BaseEmbeddingConfig",
    "BatchChecker",
    "DataType",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "PoolingType",
]
