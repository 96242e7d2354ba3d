"""Feature interactions: DLRM's pairwise dot products and DCNv2's low-rank cross network."""

from __future__ import annotations

import torch
from torch import nn


class InteractionArch(nn.Module):
    """DLRM's dot interaction (Naumov et al., 2019).

    Stacks the dense output and the ``F`` pooled embeddings into ``F + 1`` vectors of size ``D``,
    takes the dot product of every distinct pair (the strict upper triangle of the ``(F+1) x
    (F+1)`` Gram matrix) and
    concatenates those ``(F+1)F/2`` numbers after the dense output:
    ``(B, D), (B, F, D) -> (B, D + (F+1)F/2)``.
    """

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__()
        if num_sparse_features <= 0:
            raise ValueError(f"num_sparse_features must be positive, got {num_sparse_features}")
        self.num_sparse_features = num_sparse_features
        rows, cols = torch.triu_indices(num_sparse_features + 1, num_sparse_features + 1, offset=1)
        self._rows: torch.Tensor
        self._cols: torch.Tensor
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    @staticmethod
    def output_dim(num_sparse_features: int, embedding_dim: int) -> int:
        return embedding_dim + (num_sparse_features + 1) * num_sparse_features // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if sparse.shape[1] != self.num_sparse_features:
            raise ValueError(
                f"expected {self.num_sparse_features} sparse features, got {sparse.shape[1]}"
            )
        vectors = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, F+1, D)
        gram = torch.bmm(vectors, vectors.transpose(1, 2))  # (B, F+1, F+1)
        pairs = gram[:, self._rows, self._cols]
        return torch.cat([dense, pairs], dim=1)


class LowRankCrossNet(nn.Module):
    """DCNv2's cross network with low-rank weights (Wang et al., 2021, arXiv:2008.13535, eq. 2 and
    §3.3).

    Layer ``l`` computes ``x_{l+1} = x_0 * (U_l (V_l x_l) + b_l) + x_l`` with ``V_l: N -> r`` and
    ``U_l: r -> N``, so each layer costs ``2 N r`` weights instead of ``N^2``: ``(B, N) -> (B, N)``.
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        low_rank: int,
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"the cross network needs at least one layer, got {num_layers}")
        if low_rank <= 0:
            raise ValueError(f"the cross network's low rank must be positive, got {low_rank}")
        self.down = nn.ParameterList(
            [
                nn.Parameter(torch.empty(low_rank, in_features, device=device))
                for _ in range(num_layers)
            ]
        )
        self.up = nn.ParameterList(
            [
                nn.Parameter(torch.empty(in_features, low_rank, device=device))
                for _ in range(num_layers)
            ]
        )
        self.bias = nn.ParameterList(
            [nn.Parameter(torch.zeros(in_features, device=device)) for _ in range(num_layers)]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in [*self.down, *self.up]:
            if weight.device.type != "meta":
                nn.init.xavier_normal_(weight)
        for bias in self.bias:
            if bias.device.type != "meta":
                nn.init.zeros_(bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for down, up, bias in zip(self.down, self.up, self.bias, strict=True):
            x = x0 * ((x @ down.t()) @ up.t() + bias) + x
        return x


class InteractionDCNArch(nn.Module):
    """The DCNv2 interaction: the dense output and the pooled embeddings, flattened into one vector
    of
    ``N = (F+1) D`` numbers, go through a cross network: ``(B, D), (B, F, D) -> (B, (F+1) D)``."""

    def __init__(self, num_sparse_features: int, crossnet: LowRankCrossNet) -> None:
        super().__init__()
        self.num_sparse_features = num_sparse_features
        self.crossnet = crossnet

    @staticmethod
    def output_dim(num_sparse_features: int, embedding_dim: int) -> int:
        return (num_sparse_features + 1) * embedding_dim

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if sparse.shape[1] != self.num_sparse_features:
            raise ValueError(
                f"expected {self.num_sparse_features} sparse features, got {sparse.shape[1]}"
            )
        combined = torch.cat([dense, sparse.flatten(1)], dim=1)
        out: torch.Tensor = self.crossnet(combined)
        return out
