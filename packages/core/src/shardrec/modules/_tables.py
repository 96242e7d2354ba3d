"""Per-table weight holders (TorchRec's state-dict keys) and the collections' kernel builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Self

import torch
from torch import nn

from shardrec.kernels import FusedOptimizerConfig, KernelBackend, TableBatchedEmbedding
from shardrec.modules._routing import Routing
from shardrec.modules.configs import BaseEmbeddingConfig

__all__ = ["FusedParams", "TableWeight", "build_lookup"]

FusedParams = Mapping[str, object] | FusedOptimizerConfig | None


class TableWeight(nn.Module):
    """One table's ``weight`` (``[num_embeddings, embedding_dim]``): a view into the fused storage.

    It stands where TorchRec has an ``nn.EmbeddingBag``/``nn.Embedding``, so the state-dict key is
    ``embedding_bags.<table>.weight`` / ``embeddings.<table>.weight``.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.num_embeddings = int(weight.shape[0])
        self.embedding_dim = int(weight.shape[1])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        # The owning collection moves the fused storage and re-points this parameter.
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def build_lookup(
    tables: Sequence[BaseEmbeddingConfig],
    routing: Routing,
    *,
    pooled: bool,
    is_weighted: bool,
    fused_params: FusedParams,
    backend: KernelBackend | str | None,
    device: torch.device | str | None,
) -> TableBatchedEmbedding:
    if isinstance(fused_params, FusedOptimizerConfig) or fused_params is None:
        optimizer = fused_params
    else:
        optimizer = FusedOptimizerConfig.from_fused_params(fused_params)
    specs, features = routing.kernel_specs(tables, pooled=pooled)
    lookup = TableBatchedEmbedding(
        tables=specs,
        features=features,
        pooled=pooled,
        is_weighted=is_weighted,
        optimizer=optimizer,
        backend=backend,
        device=device,
    )
    if lookup.device.type != "meta":
        lookup.reset_parameters(init_fns=init_fns(tables))
    return lookup


def init_fns(
    tables: Sequence[BaseEmbeddingConfig],
) -> dict[str, Callable[[torch.Tensor], object]]:
    return {t.name: t.init_fn for t in tables if t.init_fn is not None}
