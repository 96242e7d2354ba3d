"""The inputs of one group of tables and the interface each backend implements for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shardrec.kernels.specs import FusedOptimizerConfig, TableSpec

__all__ = ["GroupInput", "LookupGroup"]


@dataclass(frozen=True, slots=True)
class GroupInput:
    """The ids of a group's features, key-major as in a KJT.

    ``values``: int64 local ids (row numbers within each feature's table); ``offsets``: int64,
    ``F_g * batch_size + 1`` entries starting at 0; ``weights``: per-id weights or None;
    ``length_per_feature``: host list of ids per feature.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    length_per_feature: list[int]
    batch_size: int


class LookupGroup(Protocol):
    """Tables stored together and looked up in one call.

    ``feature_tables[i]`` is the group-local index of the table that the group's i-th feature reads.
    """

    tables: tuple[TableSpec, ...]
    feature_tables: tuple[int, ...]

    @property
    def device(self) -> torch.device: ...

    def move_to(self, device: torch.device) -> None:
        """Allocate (from meta, uninitialised) or move the storage and state to ``device``."""

    def set_optimizer(self, optimizer: FusedOptimizerConfig) -> None:
        """Use ``optimizer`` (same rule, other hyper-parameters) from the next update on."""

    def table_weights(self) -> list[torch.Tensor]:
        """One ``[rows, dim]`` view per table into the fused storage."""

    def table_states(self) -> list[dict[str, torch.Tensor]]:
        """Per table, its optimizer state views by name."""

    def pooled(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, sum of the group's feature dims]``, feature-major blocks, fp32.

        ``params`` are the per-table parameters (plain mode: they receive ``.grad``) or one
        placeholder that requires grad (fused mode: it makes autograd call the backward that
        applies the update).
        """

    def sequence(self, inp: GroupInput, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[num_ids, dim]`` rows in the order of ``inp.values``, fp32."""
