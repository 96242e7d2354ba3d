"""Building the Criteo DLRM of a :class:`~shardrec_dlrm.config.ModelConfig`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shardrec_dlrm.config import NUM_DENSE_FEATURES, DensePrecision, ModelConfig
from shardrec_dlrm.model.dlrm import DLRM, DLRMTrain

#: Feature keys of the batches (``cat_0`` .. ``cat_25``, for C1..C26) and the tables that serve
# them.
SPARSE_FEATURES = tuple(f"cat_{i}" for i in range(26))
TABLE_NAMES = tuple(f"t_{feature}" for feature in SPARSE_FEATURES)


def build_dlrm(
    config: ModelConfig,
    *,
    embedding_device: torch.device | None = None,
    dense_device: torch.device | None = None,
    fused_params: Mapping[str, object] | None = None,
    dense_precision: DensePrecision = "fp32",
) -> DLRMTrain:
    """The model with its loss; one table per feature (``t_cat_i`` serves ``cat_i``).

    ``embedding_device="meta"`` builds the tables without memory, for the planner and for
    DistributedModelParallel to materialise shard by shard. ``fused_params`` (shardrec's
    ``{"optimizer": ..., "learning_rate": ...}``) fuses the tables' optimizer into backward.
    """
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(
            name=table,
            embedding_dim=config.embedding_dim,
            num_embeddings=rows,
            feature_names=[feature],
        )
        for table, feature, rows in zip(
            TABLE_NAMES, SPARSE_FEATURES, config.table_sizes(), strict=True
        )
    ]
    ebc = EmbeddingBagCollection(
        tables=tables, device=embedding_device, fused_params=dict(fused_params or {}) or None
    )
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=NUM_DENSE_FEATURES,
        dense_arch_layer_sizes=config.dense_arch_layer_sizes,
        over_arch_layer_sizes=config.over_arch_layer_sizes,
        interaction_type=config.interaction_type,
        dcn_num_layers=config.dcn_num_layers,
        dcn_low_rank_dim=config.dcn_low_rank_dim,
        dense_device=dense_device,
        dense_precision=dense_precision,
    )
    return DLRMTrain(model)
