"""The dense, sparse and over arches of DLRM (Naumov et al., 2019, arXiv:1906.00091)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from shardrec_dlrm.model.mlp import MLP

if TYPE_CHECKING:
    from shardrec import EmbeddingBagConfig


class DenseArch(nn.Module):
    """The bottom MLP: ``(B, num_dense) -> (B, D)``, where ``D = layer_sizes[-1]`` equals the
    embedding dim."""

    def __init__(
        self, in_features: int, layer_sizes: Sequence[int], *, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.model = MLP(in_features, layer_sizes, device=device)

    def forward(self, dense_features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(dense_features)
        return out


@runtime_checkable
class TableConfigs(Protocol):
    """What :class:`SparseArch` reads of its embedding module: the configs of its tables
    (shardrec's EmbeddingBagCollection, and modules that wrap one, have it)."""

    def embedding_bag_configs(self) -> Sequence[EmbeddingBagConfig]: ...


class SparseArch(nn.Module):
    """Looks up and pools the categorical features: ``KJT(F, B, L[f][i]) -> (B, F, D)``.

    ``embedding_bag_collection`` is a :class:`shardrec.EmbeddingBagCollection` whose tables all
    have the dimension ``D``. DistributedModelParallel may later put a sharded module in its place:
    what the trainer needs of the tables (feature count, dimension, the table of each pooled
    feature) is read once here, from the unsharded configs, so it survives that swap.
    """

    def __init__(self, embedding_bag_collection: nn.Module) -> None:
        super().__init__()
        if not isinstance(embedding_bag_collection, TableConfigs):
            raise TypeError(
                "SparseArch needs an EmbeddingBagCollection, got "
                f"{type(embedding_bag_collection).__name__}"
            )
        tables = list(embedding_bag_collection.embedding_bag_configs())
        if not tables:
            raise ValueError("SparseArch needs at least one embedding table")
        dims = {table.embedding_dim for table in tables}
        if len(dims) != 1:
            named = ", ".join(f"{table.name}={table.embedding_dim}" for table in tables)
            raise ValueError(f"all embedding tables must have the same dimension, got {named}")
        self.embedding_bag_collection: nn.Module = embedding_bag_collection
        #: The table that pools each feature, in the order of the pooled output's features.
        self.feature_tables: tuple[str, ...] = tuple(
            table.name for table in tables for _ in table.feature_names
        )
        self.num_features: int = len(self.feature_tables)
        self.embedding_dim: int = dims.pop()
        # Not a buffer: it describes how this run is distributed, not the model.
        self._grad_scale: torch.Tensor | None = None

    def scale_output_gradients(self, scale: torch.Tensor | None) -> None:
        """Multiplies the gradient of the pooled embeddings by ``scale`` (``(F * D,)``) in backward.

        The trainer uses it so that a sharded table, whose gradient is summed over the ranks that
        looked it up, learns from the mean over the global batch, as a data-parallel table
        (averaged by DDP) and a one-process run do.
        """
        self._grad_scale = scale

    def forward(self, sparse_features: object) -> torch.Tensor:
        pooled = self.embedding_bag_collection(sparse_features)
        # A sharded collection may hand back an awaitable of the pooled embeddings.
        if not hasattr(pooled, "values") and hasattr(pooled, "wait"):
            pooled = pooled.wait()
        values = _values(pooled)
        scale = self._grad_scale
        if scale is not None and values.requires_grad:
            values = _ScaleGradient.apply(values, scale)  # type: ignore[no-untyped-call]
        return values.reshape(values.shape[0], self.num_features, self.embedding_dim)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (broadcast over the batch)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        return values.view_as(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _values(pooled: object) -> torch.Tensor:
    if isinstance(pooled, torch.Tensor):
        return pooled
    values = getattr(pooled, "values", None)
    if values is None:
        raise TypeError(f"expected pooled embeddings (a KeyedTensor), got {type(pooled).__name__}")
    out = values()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"pooled embeddings' values() returned {type(out).__name__}, not a tensor")
    return out


class OverArch(nn.Module):
    """The top MLP: ``(B, in_features) -> (B, layer_sizes[-1])``; its last layer is linear."""

    def __init__(
        self, in_features: int, layer_sizes: Sequence[int], *, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.model = MLP(in_features, layer_sizes, last_activation=False, device=device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(features)
        return out
