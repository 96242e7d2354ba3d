"""The DLRM model: dense arch, sparse arch, an interaction (dot or DCNv2) and the over arch."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from shardrec_dlrm.model.arches import DenseArch, OverArch, SparseArch
from shardrec_dlrm.model.config import DENSE_PRECISIONS, DensePrecision, InteractionType
from shardrec_dlrm.model.interaction import InteractionArch, InteractionDCNArch, LowRankCrossNet


class DLRM(nn.Module):
    """Click-through model of Naumov et al. (2019), with DCNv2's cross network as an alternative
    interaction.

    ``forward(dense_features (B, num_dense), sparse_features KJT(F, B, ...)) -> logits (B, 1)``.

    The dense arch's last layer size must equal the embedding dimension ``D``: the dense output is
    the ``F+1``-th vector of the interaction.

    ``dense_precision="bf16"`` runs the dense arch, the interaction and the over arch under
    ``torch.autocast(dtype=torch.bfloat16)``: their weights stay fp32 (autocast casts them per
    forward), the embedding lookups and the logits stay fp32, and so do the dot interaction's
    products (:class:`InteractionArch` opts out). Matrix products then use bf16 units where the
    hardware has them (AMX or AVX512-BF16 CPUs, GPUs).
    """

    def __init__(
        self,
        *,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        dense_arch_layer_sizes: Sequence[int],
        over_arch_layer_sizes: Sequence[int],
        interaction_type: InteractionType = "dot",
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 512,
        dense_device: torch.device | None = None,
        dense_precision: DensePrecision = "fp32",
    ) -> None:
        super().__init__()
        if dense_precision not in DENSE_PRECISIONS:
            raise ValueError(
                f"dense_precision must be one of {', '.join(DENSE_PRECISIONS)}, "
                f"got {dense_precision!r}"
            )
        self.dense_precision: DensePrecision = dense_precision
        self.sparse_arch = SparseArch(embedding_bag_collection)
        num_features = self.sparse_arch.num_features
        dim = self.sparse_arch.embedding_dim
        if not dense_arch_layer_sizes or dense_arch_layer_sizes[-1] != dim:
            raise ValueError(
                f"the dense arch's last layer ({list(dense_arch_layer_sizes)}) must equal the "
                f"embedding dimension {dim}"
            )
        if not over_arch_layer_sizes or over_arch_layer_sizes[-1] != 1:
            raise ValueError(
                "the over arch's last layer must have size 1 (one logit), got "
                f"{list(over_arch_layer_sizes)}"
            )
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes, device=dense_device)
        self.inter_arch: InteractionArch | InteractionDCNArch
        if interaction_type == "dot":
            self.inter_arch = InteractionArch(num_features)
            over_in = InteractionArch.output_dim(num_features, dim)
        elif interaction_type == "dcn":
            over_in = InteractionDCNArch.output_dim(num_features, dim)
            crossnet = LowRankCrossNet(
                over_in, dcn_num_layers, dcn_low_rank_dim, device=dense_device
            )
            self.inter_arch = InteractionDCNArch(num_features, crossnet)
        else:
            raise ValueError(f"interaction_type must be 'dot' or 'dcn', got {interaction_type!r}")
        if dense_device is not None:
            self.inter_arch.to(dense_device)
        self.over_arch = OverArch(over_in, over_arch_layer_sizes, device=dense_device)

    def forward(self, dense_features: torch.Tensor, sparse_features: object) -> torch.Tensor:
        with self._dense_autocast(dense_features.device):
            dense = self.dense_arch(dense_features)
        sparse = self.sparse_arch(sparse_features)
        with self._dense_autocast(dense_features.device):
            logits: torch.Tensor = self.over_arch(self.inter_arch(dense, sparse))
        return logits.float()

    def _dense_autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.dense_precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class DLRMTrain(nn.Module):
    """A :class:`DLRM` with its loss (binary cross-entropy on the logit), the module to shard.

    ``forward(dense, sparse, labels) -> (mean loss, logits (B,))``.
    """

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model

    @property
    def sparse_arch(self) -> SparseArch:
        """The model's tables (sharded in place once DistributedModelParallel wraps this module)."""
        return self.model.sparse_arch

    def forward(
        self, dense_features: torch.Tensor, sparse_features: object, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(dense_features, sparse_features).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return loss, logits.detach()
