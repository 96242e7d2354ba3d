"""Building the Criteo DLRM of a :class:`~shardrec_dlrm.model.config.ModelConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import torch
from torch import nn

from shardrec_dlrm.data.schema import NUM_DENSE, SPARSE_KEYS
from shardrec_dlrm.model.config import DensePrecision, ModelConfig
from shardrec_dlrm.model.dlrm import DLRM, DLRMTrain

#: The table that serves each feature of the batches (``t_cat_i`` for ``cat_i``, C1..C26).
TABLE_NAMES: Final = tuple(f"t_{feature}" for feature in SPARSE_KEYS)


def build_dlrm(
    config: ModelConfig,
    *,
    embedding_device: torch.device | None = None,
    dense_device: torch.device | None = None,
    fused_params: Mapping[str, object] | None = None,
    dense_precision: DensePrecision = "fp32",
    managed_device: torch.device | None = None,
) -> DLRMTrain:
    """The model with its loss; one table per feature (``t_cat_i`` serves ``cat_i``).

    ``embedding_device="meta"`` builds the tables without memory, for the planner and for
    DistributedModelParallel to materialise shard by shard. ``fused_params`` (shardrec's
    ``{"optimizer": ..., "learning_rate": ...}``) fuses the tables' optimizer into backward.
    ``config.managed_ids`` other than ``off`` puts the tables behind managed ids
    (:mod:`.managed`), their id maps on ``managed_device`` (default CPU; meta to plan, or to
    shard: each rank then builds only the buckets it owns).
    """
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(
            name=table,
            embedding_dim=config.embedding_dim,
            num_embeddings=rows,
            feature_names=[feature],
        )
        for table, feature, rows in zip(TABLE_NAMES, SPARSE_KEYS, config.table_sizes(), strict=True)
    ]
    ebc = EmbeddingBagCollection(
        tables=tables, device=embedding_device, fused_params=dict(fused_params or {}) or None
    )
    sparse: nn.Module = ebc
    if config.managed_ids != "off":
        from shardrec_dlrm.model.managed import managed_tables

        sparse = managed_tables(
            ebc, config.managed_ids, num_buckets=config.managed_buckets, device=managed_device
        )
    model = DLRM(
        embedding_bag_collection=sparse,
        dense_in_features=NUM_DENSE,
        dense_arch_layer_sizes=config.dense_arch_layer_sizes,
        over_arch_layer_sizes=config.over_arch_layer_sizes,
        interaction_type=config.interaction_type,
        dcn_num_layers=config.dcn_num_layers,
        dcn_low_rank_dim=config.dcn_low_rank_dim,
        dense_device=dense_device,
        dense_precision=dense_precision,
    )
    return DLRMTrain(model)
