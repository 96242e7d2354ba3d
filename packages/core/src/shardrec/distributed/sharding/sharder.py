"""A base for sharders of EmbeddingBagCollection / EmbeddingCollection with one sharding type:
the :class:`~shardrec.distributed.types.ModuleSharder` members every such sharder answers alike,
and the checks of its part of the plan. A sharder subclasses it and writes ``shard``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardrec.distributed.qcomm import QCommsConfig
from shardrec.distributed.types import (
    EmbeddingComputeKernel,
    ParameterSharding,
    ParameterStorage,
    ShardingEnv,
)
from shardrec.modules import EmbeddingBagCollection, EmbeddingCollection

__all__ = ["EmbeddingSharderBase", "storage_bytes"]


def storage_bytes(tensor: torch.Tensor, compute_device_type: str) -> dict[str, int]:
    """``tensor``'s bytes in host memory (``"cpu"``) or accelerator memory (any other device)."""
    kind = ParameterStorage.DDR if compute_device_type == "cpu" else ParameterStorage.HBM
    return {kind.value: tensor.numel() * tensor.element_size()}


class EmbeddingSharderBase:
    """A sharder of one sharding type (the class attribute ``sharding_type``) for an
    EmbeddingBagCollection or an EmbeddingCollection, offering the compute kernels in
    ``kernels`` (preferred first)."""

    sharding_type: str
    kernels: tuple[str, ...] = (EmbeddingComputeKernel.FUSED.value,)

    def __init__(self, module_type: type[nn.Module]) -> None:
        if module_type not in (EmbeddingBagCollection, EmbeddingCollection):
            raise TypeError(f"no built-in sharder for {module_type.__name__}")
        self._module_type = module_type

    @property
    def module_type(self) -> type[nn.Module]:
        return self._module_type

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [self.sharding_type]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return list(self.kernels) if sharding_type == self.sharding_type else []

    def storage_usage(
        self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
    ) -> dict[str, int]:
        return storage_bytes(tensor, compute_device_type)

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        """The sharded replacement of ``module`` for the tables in ``params``: what a subclass
        writes (typically ``check_plan``, ``ModuleView.of``, then its sharded module)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement shard()")

    def check_plan(self, params: Mapping[str, ParameterSharding], env: ShardingEnv) -> None:
        """Every table is planned with this sharder's type, on ranks inside the world."""
        for table, ps in params.items():
            if ps.sharding_type != self.sharding_type:
                raise ValueError(
                    f"{type(self).__name__} got table {table!r} planned {ps.sharding_type!r}"
                )
            bad = [r for r in ps.ranks if not 0 <= r < env.world_size]
            if bad:
                raise ValueError(
                    f"table {table!r}: ranks {bad} outside world size {env.world_size}"
                )

    def qcomms_of(self, params: Mapping[str, ParameterSharding]) -> QCommsConfig | None:
        """The wire dtypes of the part's pooled outputs: its tables share one output collective,
        so their plans must agree (None, or all fp32: no compression)."""
        configs = {table: ps.qcomms for table, ps in params.items()}
        chosen = {c for c in configs.values() if c is not None and not c.is_fp32}
        if len(chosen) > 1 or (chosen and None in configs.values()):
            listed = ", ".join(f"{t}: {c}" for t, c in configs.items())
            raise ValueError(
                f"{self.sharding_type} tables of one module share their output collective, so"
                f" their qcomms must agree; got {listed}"
            )
        return next(iter(chosen), None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._module_type.__name__})"
