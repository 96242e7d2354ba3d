"""Reads the shardable tables out of a model, on any device (meta included)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from torch import nn

from shardrec.distributed.planner.types import PlannerTable
from shardrec.kernels.specs import OptimizerType, parse_optimizer


def _configs(module: nn.Module) -> tuple[Sequence[object], bool] | None:
    for attr, pooled in (("embedding_bag_configs", True), ("embedding_configs", False)):
        getter = getattr(module, attr, None)
        if callable(getter):
            configs = getter()
            if isinstance(configs, Sequence):
                return configs, pooled
    return None


def _element_size(config: object) -> int:
    from shardrec.modules.configs import DataType, data_type_to_dtype

    data_type = getattr(config, "data_type", DataType.FP32)
    return data_type_to_dtype(data_type).itemsize


def _fused_optimizer(module: nn.Module) -> OptimizerType | None:
    """The module's fused optimizer (None: plain ``.grad`` training, or a module naming none)."""
    lookup = getattr(module, "lookup", None)
    config = getattr(lookup, "optimizer", None)
    name = getattr(config, "optimizer", None)
    return None if name is None else parse_optimizer(name)


def tables_in_module(module: nn.Module, module_path: str) -> list[PlannerTable]:
    """The tables of one shardable module, from its configs (TorchRec's accessors) or its 2-D
    weights."""
    found = _configs(module)
    if found is not None:
        configs, pooled = found
        out = []
        for c in configs:
            feature_names = getattr(c, "feature_names", []) or []
            out.append(
                PlannerTable(
                    module_path=module_path,
                    param_name=str(getattr(c, "name")),  # noqa: B009
                    num_embeddings=int(getattr(c, "num_embeddings")),  # noqa: B009
                    embedding_dim=int(getattr(c, "embedding_dim")),  # noqa: B009
                    module_type=type(module),
                    element_size=_element_size(c),
                    num_features=max(1, len(feature_names)),
                    pooled=pooled and str(getattr(c, "pooling", "SUM")) != "NONE",
                    optimizer=_fused_optimizer(module),
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


def tables_of(model: nn.Module, module_types: Collection[type]) -> list[PlannerTable]:
    """Every table of every shardable module (exact type match), outermost modules only, in model
    order."""
    out: list[PlannerTable] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if type(module) not in module_types:
            continue
        if any(path == c or path.startswith(c + ".") for c in claimed if c) or ("" in claimed):
            continue
        claimed.append(path)
        out.extend(tables_in_module(module, path))
    return out
