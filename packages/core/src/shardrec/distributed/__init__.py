"""Sharding embedding modules across processes: plans, the sharder plugin interface and DMP.

``DistributedModelParallel`` and the plugin manager are imported on first use, so that importing the
plan types stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    # mypy sees each lazy name as what it is; at run time __getattr__ imports it on first use.
    from shardrec.distributed.hookspecs import hookimpl
    from shardrec.distributed.model_parallel import DistributedModelParallel, create_plan
    from shardrec.distributed.plugins import PluginError, load_sharder_registry

_LAZY: dict[str, str] = {
    "DistributedModelParallel": "shardrec.distributed.model_parallel",
    "create_plan": "shardrec.distributed.model_parallel",
    "PluginError": "shardrec.distributed.plugins",
    "load_sharder_registry": "shardrec.distributed.plugins",
    "hookimpl": "shardrec.distributed.hookspecs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shardrec.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [  # noqa: RUF022 (the lazy names first)
    "DistributedModelParallel",
    "PluginError",
    "create_plan",
    "hookimpl",
    "load_sharder_registry",
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
