"""Feature interactions: DLRM's pairwise dot products and DCNv2's low-rank cross network."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable


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
        n = num_sparse_features + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        # Positions in the flattened (n x n) Gram matrix: the pairs above the diagonal, and for
        # backward, each position's pair number plus one (0 on the diagonal, read as a zero).
        pair_of_position = torch.zeros(n * n, dtype=torch.long)
        numbers = torch.arange(1, rows.numel() + 1)
        pair_of_position[rows * n + cols] = numbers
        pair_of_position[cols * n + rows] = numbers
        self._upper: torch.Tensor
        self._pair_of_position: torch.Tensor
        self.register_buffer("_upper", rows * n + cols, persistent=False)
        self.register_buffer("_pair_of_position", pair_of_position, persistent=False)

    @staticmethod
    def output_dim(num_sparse_features: int, embedding_dim: int) -> int:
        return embedding_dim + (num_sparse_features + 1) * num_sparse_features // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if sparse.shape[1] != self.num_sparse_features:
            raise ValueError(
                f"expected {self.num_sparse_features} sparse features, got {sparse.shape[1]}"
            )
        device_type = dense.device.type
        if torch.is_autocast_enabled(device_type):
            # In fp32 under autocast: the products are small batched ones that bf16 units do not
            # speed up here, and casting the (B, F, D) embeddings to bf16 and their gradient
            # back cost more than the whole interaction (measured on AMX CPUs).
            with torch.autocast(device_type=device_type, enabled=False):
                return self._interact(dense.float(), sparse.float())
        return self._interact(dense, sparse)

    def _interact(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _DotInteraction.apply(  # type: ignore[no-untyped-call]
            dense, sparse, self._upper, self._pair_of_position
        )
        return out


class _DotInteraction(torch.autograd.Function):
    """``(B, D), (B, F, D) -> (B, D + P)``: the dense vector, then the ``P`` pairwise dot products.

    Autograd through ``gram[:, rows, cols]`` costs an advanced-indexing gather forward and an
    accumulating ``index_put_`` plus two ``bmm`` backward (about 21 ms of a DLRM step at batch
    2048 on 2 CPU cores). The pairs are distinct, so the gradient of the Gram matrix is
    ``G + G^T`` with ``G`` the scattered pair gradients: one gather builds it and one ``bmm`` with
    the vectors gives every vector's gradient (about 7 ms forward and backward together).
    """

    @staticmethod
    def forward(
        ctx: Any,
        dense: torch.Tensor,
        sparse: torch.Tensor,
        upper: torch.Tensor,
        pair_of_position: torch.Tensor,
    ) -> torch.Tensor:
        batch, n = dense.shape[0], sparse.shape[1] + 1
        vectors = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, F+1, D)
        gram = torch.bmm(vectors, vectors.transpose(1, 2)).view(batch, n * n)
        ctx.save_for_backward(vectors, pair_of_position)
        return torch.cat([dense, gram.index_select(1, upper)], dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        vectors, pair_of_position = ctx.saved_tensors
        batch, n, dim = vectors.shape
        grad_pairs = grad_out[:, dim:]
        with_zero = torch.cat([grad_pairs.new_zeros(batch, 1), grad_pairs], dim=1)
        symmetric = with_zero.index_select(1, pair_of_position).view(batch, n, n)
        grad_vectors = torch.bmm(symmetric, vectors)
        grad_dense = grad_vectors[:, 0] + grad_out[:, :dim]
        return grad_dense, grad_vectors[:, 1:], None, None


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
