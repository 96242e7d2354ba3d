"""Small test models written as a list of tables, each ``(name, rows, dim, features)``.

The sharder tests each lay out their own tables (row counts that do not divide the world size,
tables shared by features, features read by two tables); this builds the model from that list, as
pooled bags or as sequences. An ``EmbeddingCollection``'s tables share one dimension, so the
sequence form puts every table at ``SEQUENCE_DIM``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from shardrec import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from shardrec.testing import EmbeddingModel

TableRow = tuple[str, int, int, list[str]]

SEQUENCE_DIM: Final = 4


def table_model(
    tables: Sequence[TableRow],
    kind: str,
    fused: Mapping[str, Any] | None,
    *,
    pooling: str = "SUM",
    weighted: bool = False,
) -> EmbeddingModel:
    """``kind`` ``"ec"``: sequences at ``SEQUENCE_DIM``; otherwise pooled bags at each table's dim.
    ``fused`` None trains plain parameters."""
    if kind == "ec":
        seqs = [
            EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=SEQUENCE_DIM, feature_names=f)
            for n, r, _, f in tables
        ]
        return EmbeddingModel(tables=seqs, fused_params=fused)
    bags = [
        EmbeddingBagConfig(
            name=n, num_embeddings=r, embedding_dim=d, feature_names=f, pooling=PoolingType(pooling)
        )
        for n, r, d, f in tables
    ]
    return EmbeddingModel(tables=bags, fused_params=fused, weighted=weighted)
