"""The FBGEMM table-batched lookup: one ``SplitTableBatchedEmbeddingBagsCodegen`` per group.

FBGEMM owns the fused storage; the per-table weights and states are its views. All calls go through
``shardrec.ops``. The FBGEMM module is built when the group gets a real device (never on meta).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from shardrec import ops
from shardrec.kernels.group import GroupInput
from shardrec.kernels.specs import FusedOptimizerConfig, PoolingType, TableSpec, data_type_to_dtype

__all__ = ["FbgemmGroup"]


class FbgemmGroup:
    """Tables of one data type and one pooling mode, looked up by FBGEMM with a fused optimizer."""

    def __init__(
        self,
        *,
        tables: Sequence[TableSpec],
        feature_tables: Sequence[int],
        pooling: PoolingType,
        optimizer: FusedOptimizerConfig,
        device: torch.device,
    ) -> None:
        self.tables = tuple(tables)
        self.feature_tables = tuple(feature_tables)
        self.pooling = pooling
        self.optimizer = optimizer
        self.module: nn.Module | None = None
        if device.type != "meta":
            self.module = self._build(device)

    def __getstate__(self) -> dict[str, object]:
        # FBGEMM's module does not pickle (it holds local functions), and a deep copy of it would
        # keep FBGEMM's internal pointers consistent only by luck: copy the tables and states out,
        # and rebuild the module on the other side.
        state = dict(self.__dict__)
        state["module"] = None
        if self.module is not None:
            state["_device"] = self.device
            state["_weights"] = [w.clone() for w in self.table_weights()]
            state["_states"] = [
                {name: t.clone() for name, t in per_table.items()}
                for per_table in self.table_states()
            ]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        weights = state.pop("_weights", None)
        states = state.pop("_states", None)
        device = state.pop("_device", None)
        self.__dict__.update(state)
        if isinstance(device, torch.device):
            self.module = self._build(device)
            assert isinstance(weights, list)
            assert isinstance(states, list)
            with torch.no_grad():
                for new, old in zip(self.table_weights(), weights, strict=True):
                    new.copy_(old)
                for new_s, old_s in zip(self.table_states(), states, strict=True):
                    for name, tensor in new_s.items():
                        tensor.copy_(old_s[name])

    def _build(self, device: torch.device) -> nn.Module:
        return ops.make_table_batched_embedding(
            shapes=[(t.num_embeddings, t.embedding_dim) for t in self.tables],
            feature_table_map=self.feature_tables,
            pooling=self.pooling,
            data_type=self.tables[0].data_type,
            optimizer=self.optimizer,
            device=device,
        )

    @property
    def device(self) -> torch.device:
        if self.module is None:
            return torch.device("meta")
        # Asked on every lookup: read one parameter, not FBGEMM's per-table views (a slice each).
        for param in self.module.parameters():
            if param.numel() > 0:
                return param.device
        return self.table_weights()[0].device

    def move_to(self, device: torch.device) -> None:
        if device == self.device:
            return
        old_weights = None if self.module is None else self.table_weights()
        old_states = None if self.module is None else self.table_states()
        self.module = self._build(device)
        if old_weights is not None and old_states is not None:
            with torch.no_grad():
                for new, old in zip(self.table_weights(), old_weights, strict=True):
                    new.copy_(old)
                for new_s, old_s in zip(self.table_states(), old_states, strict=True):
                    for name, tensor in new_s.items():
                        tensor.copy_(old_s[name])

    def set_optimizer(self, optimizer: FusedOptimizerConfig) -> None:
        if optimizer.optimizer is not self.optimizer.optimizer or (
            dataclasses.replace(optimizer, learning_rate=self.optimizer.learning_rate)
            != self.optimizer
        ):
            raise ValueError("FBGEMM's fused optimizer can change its learning rate only")
        self.optimizer = optimizer  # a later rebuild (move_to) starts from this rate
        if self.module is not None:
            ops.tbe_set_learning_rate(self.module, optimizer.learning_rate)

    def table_weights(self) -> list[torch.Tensor]:
        if self.module is None:
            return [
                torch.empty(
                    t.num_embeddings,
                    t.embedding_dim,
                    dtype=data_type_to_dtype(t.data_type),
                    device="meta",
                )
                for t in self.tables
            ]
        return ops.tbe_table_weights(self.module)

    def table_states(self) -> list[dict[str, torch.Tensor]]:
        if self.module is None:
            return [{} for _ in self.tables]
        return ops.tbe_optimizer_states(self.module, self.optimizer.optimizer)

    def _require_module(self) -> nn.Module:
        if self.module is None:
            raise RuntimeError(
                "the tables are on the meta device: call reset_parameters() or to_empty() first"
            )
        return self.module

    def pooled(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        return ops.tbe_forward(self._require_module(), inp.values, inp.offsets, inp.weights)

    def sequence(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        return ops.tbe_forward(self._require_module(), inp.values, inp.offsets, None)
