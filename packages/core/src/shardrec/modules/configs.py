"""Embedding table configurations, with TorchRec's names, fields and defaults.

``EmbeddingBagConfig`` describes a pooled table (one vector per bag of ids), ``EmbeddingConfig`` a
sequence table (one vector per id). Both validate their sizes on construction, so a bad config fails
where it is written rather than inside a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardrec.kernels.specs import DataType, PoolingType, StorageChoice, data_type_to_dtype

__all__ = [
    "BaseEmbeddingConfig",
    "DataType",
    "EmbeddingBagConfig",
    "EmbeddingConfig",
    "PoolingType",
    "StorageChoice",
    "UniformInit",
    "data_type_to_dtype",
]


InitFn = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True, slots=True)
class UniformInit:
    """The default ``init_fn``: a uniform draw in ``[low, high]``, in place. A class rather than a
    closure so that configs, and the modules holding them, can be pickled."""

    low: float
    high: float

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.uniform_(weight, self.low, self.high)


@dataclass
class BaseEmbeddingConfig:
    """Fields shared by pooled and sequence tables.

    ``weight_init_min``/``weight_init_max`` default to ``∓sqrt(1 / num_embeddings)``; ``init_fn``
    defaults to a uniform draw between them and is called on the table's weight tensor (in place).
    ``storage``: the storage backend that holds the table and runs its fused lookup-and-update,
    whatever its sharding (``StorageChoice("mmap", {"directory": ...})`` with the example plugin);
    None: the module's ``backend=`` (``torch``, ``fbgemm`` or ``auto``), as before.
    """

    num_embeddings: int
    embedding_dim: int
    name: str = ""
    data_type: DataType = DataType.FP32
    feature_names: list[str] = field(default_factory=list)
    weight_init_max: float | None = None
    weight_init_min: float | None = None
    init_fn: InitFn | None = None
    storage: StorageChoice | None = None

    def __post_init__(self) -> None:
        where = f"table {self.name!r}" if self.name else "an unnamed table"
        if self.storage is not None and not isinstance(self.storage, StorageChoice):
            raise TypeError(
                f"storage of {where} must be a StorageChoice or None, got {self.storage!r}"
            )
        for what in ("num_embeddings", "embedding_dim"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{what} of {where} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{what} of {where} must be >= 1, got {value}")
        try:
            self.data_type = DataType(self.data_type)
        except ValueError:
            allowed = ", ".join(d.value for d in DataType)
            raise ValueError(
                f"data_type of {where} must be one of {allowed}, got {self.data_type!r}"
            ) from None
        bound = math.sqrt(1.0 / self.num_embeddings)
        if self.weight_init_max is None:
            self.weight_init_max = bound
        if self.weight_init_min is None:
            self.weight_init_min = -bound
        if self.weight_init_min > self.weight_init_max:
            raise ValueError(
                f"weight_init_min ({self.weight_init_min}) > weight_init_max"
                f" ({self.weight_init_max}) in {where}"
            )
        if self.init_fn is None:
            self.init_fn = UniformInit(self.weight_init_min, self.weight_init_max)

    def num_features(self) -> int:
        """Number of features that read this table."""
        return len(self.feature_names)


@dataclass
class EmbeddingBagConfig(BaseEmbeddingConfig):
    """A pooled table: each bag of ids becomes one vector (``SUM`` or ``MEAN`` of its rows)."""

    pooling: PoolingType = PoolingType.SUM

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.pooling = PoolingType(self.pooling)
        except ValueError:
            raise ValueError(
                f"pooling of table {self.name!r} must be SUM, MEAN or NONE, got {self.pooling!r}"
            ) from None


@dataclass
class EmbeddingConfig(BaseEmbeddingConfig):
    """A sequence table: each id becomes one row of the output (no pooling)."""
