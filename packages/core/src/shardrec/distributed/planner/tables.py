"""Reads the shardable tables out of a model, on any device (meta included)."""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from shardrec.distributed.planner.types import PlannerTable
from shardrec.distributed.sharding.contract import HasFusedLookup, embedding_tables
from shardrec.kernels.specs import OptimizerType, parse_optimizer
from shardrec.modules.configs import (
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    PoolingType,
    data_type_to_dtype,
)


def _element_size(config: BaseEmbeddingConfig) -> int:
    return data_type_to_dtype(config.data_type).itemsize


def _fused_optimizer(module: nn.Module) -> OptimizerType | None:
    """The module's fused optimizer (None: plain ``.grad`` training, or a module naming none)."""
    if not isinstance(module, HasFusedLookup):
        return None
    config = module.lookup.optimizer
    return None if config is None else parse_optimizer(config.optimizer)


def tables_in_module(module: nn.Module, module_path: str) -> list[PlannerTable]:
    """The tables of one shardable module, from its configs (TorchRec's accessors) or its 2-D
    weights."""
    found = embedding_tables(module)
    if found is not None:
        configs, pooled = found
        out = []
        for c in configs:
            unpooled = isinstance(c, EmbeddingBagConfig) and c.pooling is PoolingType.NONE
            out.append(
                PlannerTable(
                    module_path=module_path,
                    param_name=c.name,
                    num_embeddings=c.num_embeddings,
                    embedding_dim=c.embedding_dim,
                    module_type=type(module),
                    element_size=_element_size(c),
                    num_features=max(1, len(c.feature_names)),
                    pooled=pooled and not unpooled,
                    optimizer=_fused_optimizer(module),
                    storage=c.storage,
                )
            )
        return out
    # A plugin's own module type: every 2-D parameter ``<...>.<table>.weight`` is a table.
    out = []
    for name, param in module.named_parameters():
        parts = name.split(".")
        if param.dim() == 2 and len(parts) >= 2 and parts[-1] == "weight":
            out.append(
                PlannerTable(
                    module_path=module_path,
                    param_name=parts[-2],
                    num_embeddings=int(param.shape[0]),
                    embedding_dim=int(param.shape[1]),
                    module_type=type(module),
                    element_size=param.element_size(),
                )
            )
    return out


def shardable_modules(
    model: nn.Module, module_types: Collection[type]
) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every shardable module (exact type match), outermost modules only,
    in model order."""
    out: list[tuple[str, nn.Module]] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if type(module) not in module_types:
            continue
        if any(path == c or path.startswith(c + ".") for c in claimed if c) or ("" in claimed):
            continue
        claimed.append(path)
        out.append((path, module))
    return out


def tables_of(model: nn.Module, module_types: Collection[type]) -> list[PlannerTable]:
    """Every table of every shardable module (exact type match), outermost modules only, in model
    order."""
    out: list[PlannerTable] = []
    for path, module in shardable_modules(model, module_types):
        out.extend(tables_in_module(module, path))
    return out
