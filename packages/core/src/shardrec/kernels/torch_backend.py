"""The pure-PyTorch table-batched lookup: one storage per (data type, dim), one lookup call.

Tables of one group are stacked in one ``[sum of rows, dim]`` tensor; a feature's ids are shifted by
the first row of its table, so all features of the group are looked up by one ``F.embedding_bag``
(pooled) or ``F.embedding`` (sequence) call. ``MEAN`` pooling is a ``SUM`` with per-id weights
``1 / bag length``, which lets SUM and MEAN tables of the same dim share the call. In fused mode
backward never forms a dense gradient of a table: it gathers one gradient row per id and hands them
to the fused optimizer, which updates the touched rows in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from shardrec.kernels.group import GroupInput
from shardrec.kernels.optimizers import apply_fused_update, new_state
from shardrec.kernels.specs import FusedOptimizerConfig, PoolingType, TableSpec, data_type_to_dtype

__all__ = ["TorchGroup"]


class TorchGroup:
    """Tables that share one data type and one dim, stored in one tensor."""

    def __init__(
        self,
        *,
        tables: Sequence[TableSpec],
        feature_tables: Sequence[int],
        optimizer: FusedOptimizerConfig | None,
        device: torch.device,
    ) -> None:
        self.tables = tuple(tables)
        self.feature_tables = tuple(feature_tables)
        self.optimizer = optimizer
        self.dim = self.tables[0].embedding_dim
        self.dtype = data_type_to_dtype(self.tables[0].data_type)
        starts = [0]
        for t in self.tables:
            starts.append(starts[-1] + t.num_embeddings)
        self.row_starts = starts
        self.num_rows = starts[-1]
        bases = [starts[t] for t in self.feature_tables]
        self._feature_base = torch.tensor(bases, dtype=torch.int64)
        self._bases_all_zero = not any(bases)
        mean = [self.tables[t].pooling is PoolingType.MEAN for t in self.feature_tables]
        self._mean = torch.tensor(mean, dtype=torch.bool)
        self._any_mean = any(mean)
        self._all_mean = all(mean)
        self.step = 0
        self.storage = torch.empty(self.num_rows, self.dim, dtype=self.dtype, device=device)
        self.state: dict[str, torch.Tensor] = (
            new_state(optimizer, self.num_rows, self.dim, device) if optimizer is not None else {}
        )

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def move_to(self, device: torch.device) -> None:
        if device == self.device:
            return
        if self.device.type == "meta":
            self.storage = torch.empty_like(self.storage, device=device)
            self.state = {k: torch.zeros_like(v, device=device) for k, v in self.state.items()}
        else:
            self.storage = self.storage.to(device)
            self.state = {k: v.to(device) for k, v in self.state.items()}
        self._feature_base = self._feature_base.to(device)
        self._mean = self._mean.to(device)

    def table_weights(self) -> list[torch.Tensor]:
        s = self.row_starts
        return [self.storage[s[i] : s[i + 1]] for i in range(len(self.tables))]

    def table_states(self) -> list[dict[str, torch.Tensor]]:
        s = self.row_starts
        return [
            {k: v[s[i] : s[i + 1]] for k, v in self.state.items()} for i in range(len(self.tables))
        ]

    def _global_ids(self, inp: GroupInput) -> torch.Tensor:
        if self._bases_all_zero:
            return inp.values
        counts = torch.tensor(inp.length_per_feature, dtype=torch.int64, device=inp.values.device)
        base = torch.repeat_interleave(self._feature_base, counts, output_size=inp.values.numel())
        return inp.values + base

    def _pooling_weights(self, inp: GroupInput) -> torch.Tensor | None:
        weights = inp.weights
        if not self._any_mean:
            return weights
        lengths = inp.offsets.diff()
        inv = 1.0 / lengths.clamp(min=1).to(torch.float32)
        if not self._all_mean:
            per_bag_mean = self._mean.repeat_interleave(inp.batch_size)
            inv = torch.where(per_bag_mean, inv, torch.ones_like(inv))
        scale = torch.repeat_interleave(inv, lengths, output_size=inp.values.numel())
        return scale if weights is None else scale * weights

    def pooled(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        ids = self._global_ids(inp)
        psw = self._pooling_weights(inp)
        out: torch.Tensor = _PooledLookup.apply(  # type: ignore[no-untyped-call]
            self, ids, inp.offsets, psw, inp.batch_size, len(self.feature_tables), *params
        )
        return out

    def sequence(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        ids = self._global_ids(inp)
        out: torch.Tensor = _SequenceLookup.apply(self, ids, *params)  # type: ignore[no-untyped-call]
        return out

    def backward_rows(
        self, ids: torch.Tensor, grads: torch.Tensor, num_params: int
    ) -> tuple[torch.Tensor | None, ...]:
        """Apply the fused update (fused mode) or build the tables' dense gradients (plain mode)."""
        if self.optimizer is not None:
            self.step += 1
            apply_fused_update(self.optimizer, self.storage, self.state, ids, grads, self.step)
            return (None,) * num_params
        dense = torch.zeros(self.num_rows, self.dim, dtype=self.dtype, device=grads.device)
        dense.index_add_(0, ids, grads.to(self.dtype))
        s = self.row_starts
        return tuple(dense[s[i] : s[i + 1]] for i in range(len(self.tables)))


class _PooledLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        group: TorchGroup,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        psw: torch.Tensor | None,
        batch_size: int,
        num_features: int,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        weight = group.storage
        psw_in = psw.to(weight.dtype) if psw is not None else None
        bags = F.embedding_bag(
            ids, weight, offsets, mode="sum", per_sample_weights=psw_in, include_last_offset=True
        )
        out = bags.view(num_features, batch_size, group.dim).transpose(0, 1)
        out = out.reshape(batch_size, num_features * group.dim)
        ctx.group = group
        ctx.batch_size = batch_size
        ctx.num_features = num_features
        ctx.num_params = len(params)
        ctx.save_for_backward(ids, offsets, psw)
        return out.float() if out.dtype != torch.float32 else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        group: TorchGroup = ctx.group
        ids, offsets, psw = ctx.saved_tensors
        batch, nf = ctx.batch_size, ctx.num_features
        rows_by_sample = grad.contiguous().view(batch * nf, group.dim)
        num_bags = nf * batch
        if ids.numel() == num_bags:
            # One id per bag (the common case): id i belongs to bag i; skip the expansion.
            bag = torch.arange(num_bags, device=ids.device)
        else:
            lengths = offsets.diff()
            bag = torch.repeat_interleave(
                torch.arange(num_bags, device=ids.device), lengths, output_size=ids.numel()
            )
        # Bags are key-major (f * B + b); the gradient is sample-major (b * F + f).
        row = (bag % batch) * nf + torch.div(bag, batch, rounding_mode="floor")
        grads = rows_by_sample.index_select(0, row)
        if psw is not None:
            grads = grads * psw.unsqueeze(1)
        param_grads = group.backward_rows(ids, grads, ctx.num_params)
        return (None, None, None, None, None, None, *param_grads)


class _SequenceLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, group: TorchGroup, ids: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        out = F.embedding(ids, group.storage)
        ctx.group = group
        ctx.num_params = len(params)
        ctx.save_for_backward(ids)
        return out.float() if out.dtype != torch.float32 else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        group: TorchGroup = ctx.group
        (ids,) = ctx.saved_tensors
        param_grads = group.backward_rows(ids, grad.contiguous(), ctx.num_params)
        return (None, None, *param_grads)
