"""Sharding embedding modules across processes: plans, the sharder plugin interface and DMP.

``DistributedModelParallel`` and the plugin manager are imported on first use, so that importing the
plan types stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from shardrec.distributed.types import (
    EmbeddingComputeKernel,
    EmbeddingModuleShardingPlan,
    LocalShard,
    ModuleSharder,
    ParameterSharding,
    ParameterStorage,
    ShardedEmbeddingModule,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
    TableShards,
)

_LAZY: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shardrec.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "EmbeddingComputeKernel",
    "EmbeddingModuleShardingPlan",
    "LocalShard",
    "ModuleSharder",
    "ParameterSharding",
    "ParameterStorage",
    "ShardMetadata",
    "ShardedEmbeddingModule",
    "ShardingEnv",
    "ShardingPlan",
    "ShardingType",
    "TableShards",
]
