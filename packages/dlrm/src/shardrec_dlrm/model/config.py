"""The shape of the DLRM: one dataclass, saved beside every checkpoint so that ``dlrm evaluate``
can rebuild the model it scores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from shardrec_dlrm.data.schema import NUM_SPARSE

InteractionType = Literal["dot", "dcn"]
DensePrecision = Literal["fp32", "bf16"]
#: ``off``: ids are hashed to rows (``1 + id % (rows - 1)``); ``lru`` / ``lfu``: the raw ids get
#: rows of their own in managed tables (``shardrec.modules.mc_modules``), evicting the least
#: recently / least frequently read row when a table is full.
ManagedIds = Literal["off", "lru", "lfu"]

INTERACTION_TYPES: Final = get_args(InteractionType)
DENSE_PRECISIONS: Final = get_args(DensePrecision)
MANAGED_IDS: Final = get_args(ManagedIds)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """What it takes to rebuild the model's shapes (saved with checkpoints)."""

    embedding_dim: int = 64
    num_embeddings: int = 100_000
    num_embeddings_per_feature: tuple[int, ...] | None = None
    dense_arch_layer_sizes: tuple[int, ...] = (512, 256, 64)
    over_arch_layer_sizes: tuple[int, ...] = (512, 512, 256, 1)
    interaction_type: InteractionType = "dot"
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 512
    managed_ids: ManagedIds = "off"
    #: Buckets of every managed table (``ManagedCollisionCollection(num_buckets=...)``): part of
    #: the model (which rows an id may take), so fixed for the life of a run whatever the number
    #: of processes. 1 keeps a table's map whole; more spread one table's map over the ranks.
    managed_buckets: int = 1

    def __post_init__(self) -> None:
        positive("embedding_dim", self.embedding_dim)
        if self.num_embeddings < 2:
            raise ValueError(
                "num_embeddings must be >= 2 (row 0 holds missing values), got "
                f"{self.num_embeddings}"
            )
        positive("dcn_num_layers", self.dcn_num_layers)
        positive("dcn_low_rank_dim", self.dcn_low_rank_dim)
        if self.num_embeddings_per_feature is not None:
            sizes = self.num_embeddings_per_feature
            if len(sizes) != NUM_SPARSE:
                raise ValueError(
                    f"num_embeddings_per_feature needs {NUM_SPARSE} numbers, got {len(sizes)}"
                )
            for index, size in enumerate(sizes):
                if size < 2:
                    raise ValueError(
                        f"num_embeddings_per_feature[{index}] (C{index + 1}) must be >= 2: row 0 "
                        f"holds missing values; got {size}"
                    )
        if self.managed_ids not in MANAGED_IDS:
            raise ValueError(
                f"managed_ids must be one of {', '.join(MANAGED_IDS)}, got {self.managed_ids!r}"
            )
        self._check_managed_buckets()
        if self.interaction_type not in INTERACTION_TYPES:
            raise ValueError(
                f"interaction_type must be one of {', '.join(INTERACTION_TYPES)}, "
                f"got {self.interaction_type!r}"
            )
        if not self.dense_arch_layer_sizes or self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                "dense_arch_layer_sizes must end with the embedding dimension "
                f"{self.embedding_dim}, "
                f"got {','.join(map(str, self.dense_arch_layer_sizes))}"
            )
        if not self.over_arch_layer_sizes or self.over_arch_layer_sizes[-1] != 1:
            raise ValueError(
                "over_arch_layer_sizes must end with 1 (the logit), got "
                f"{','.join(map(str, self.over_arch_layer_sizes))}"
            )
        for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            for size in getattr(self, name):
                positive(name, size)

    def _check_managed_buckets(self) -> None:
        positive("managed_buckets", self.managed_buckets)
        if self.managed_buckets == 1:
            return
        if self.managed_ids == "off":
            raise ValueError(
                f"managed_buckets {self.managed_buckets} needs managed tables (managed_ids lru or"
                " lfu); hashed tables have no buckets"
            )
        for index, size in enumerate(self.table_sizes()):
            # The last row is the default row; every bucket needs a row of its own besides it.
            if self.managed_buckets > size - 1:
                raise ValueError(
                    f"managed_buckets {self.managed_buckets} is more than table C{index + 1}"
                    f" (t_cat_{index}) of {size} rows can split into: at most {size - 1}"
                )

    def table_sizes(self) -> tuple[int, ...]:
        if self.num_embeddings_per_feature is not None:
            return self.num_embeddings_per_feature
        return (self.num_embeddings,) * NUM_SPARSE


def model_config_from_dict(values: dict[str, Any], *, source: str) -> ModelConfig:
    """Rebuilds a :class:`ModelConfig` saved by :meth:`TrainConfig.to_json`; errors name
    ``source``."""
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model setting(s) {', '.join(unknown)}")
    fixed = dict(values)
    for name in ("num_embeddings_per_feature", "dense_arch_layer_sizes", "over_arch_layer_sizes"):
        if isinstance(fixed.get(name), list):
            fixed[name] = tuple(fixed[name])
    try:
        return ModelConfig(**fixed)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error


def positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
