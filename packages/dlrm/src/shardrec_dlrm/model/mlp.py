"""A stack of fully connected layers, the building block of the dense and over arches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """``Linear -> ReLU`` per layer size; ``(B, in_features) -> (B, layer_sizes[-1])``.

    With ``last_activation=False`` the final layer stays linear, as the over arch needs (it emits a
    logit).
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        *,
        last_activation: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"MLP in_features must be positive, got {in_features}")
        if not layer_sizes:
            raise ValueError("MLP layer_sizes must name at least one layer")
        bad = [size for size in layer_sizes if size <= 0]
        if bad:
            raise ValueError(f"MLP layer sizes must be positive, got {list(layer_sizes)}")
        layers: list[nn.Module] = []
        width = in_features
        for index, size in enumerate(layer_sizes):
            layers.append(nn.Linear(width, size, device=device))
            if last_activation or index < len(layer_sizes) - 1:
                layers.append(nn.ReLU())
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out
