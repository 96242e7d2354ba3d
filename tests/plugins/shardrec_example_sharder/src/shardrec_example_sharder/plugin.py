"""The ``local_copy`` sharding type: every rank keeps its own, independent copy of the tables.

No input or output distribution: each rank looks up its own batch in its copy, and the copies
are trained separately (useful for tables that are tiny, or frozen). It exists to show how a
third party adds a sharding type to shardrec without touching shardrec.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from shardrec import EmbeddingBagCollection, KeyedJaggedTensor, KeyedTensor
from shardrec.distributed.hookspecs import RegisterSharder, hookimpl
from shardrec.distributed.types import (
    LocalShard,
    ParameterSharding,
    ShardingEnv,
    TableShards,
)

LOCAL_COPY = "local_copy"


class LocalCopyEmbeddingBagCollection(nn.Module):
    def __init__(self, module: EmbeddingBagCollection, device: torch.device) -> None:
        super().__init__()
        self.copy = copy.deepcopy(module).to(device)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        out: KeyedTensor = self.copy(kjt)
        return out

    def local_table_shards(self) -> dict[str, TableShards]:
        # The fused optimizer's state too: without it a checkpoint would lose it.
        states = self.copy.lookup.optimizer_states()
        return {
            name: TableShards(
                weight=[_whole(w)],
                optimizer_state={k: [_whole(s)] for k, s in states[name].items()},
                replicated=True,
            )
            for name, w in self.copy.lookup.table_weights().items()
        }


def _whole(tensor: torch.Tensor) -> LocalShard:
    return LocalShard(tensor, (0,) * tensor.dim(), tuple(tensor.shape))


class LocalCopySharder:
    @property
    def module_type(self) -> type[nn.Module]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [LOCAL_COPY]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return ["fused"]

    def storage_usage(
        self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
    ) -> dict[str, int]:
        kind = "ddr" if compute_device_type == "cpu" else "hbm"
        return {kind: tensor.numel() * tensor.element_size()}

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        assert isinstance(module, EmbeddingBagCollection)
        tables = {c.name for c in module.embedding_bag_configs()}
        if set(params) != tables:
            raise ValueError(
                f"local_copy shards all tables of a module at once, got {sorted(params)}"
            )
        return LocalCopyEmbeddingBagCollection(module, device)


@hookimpl
def shardrec_register_sharders(register: RegisterSharder) -> None:
    register(LocalCopySharder())
