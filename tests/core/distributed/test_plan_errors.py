"""A plan whose shards do not tile their table is refused before anything is built, naming the
table and the pieces."""

from __future__ import annotations

import pytest
import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig
from shardrec.distributed.types import ParameterSharding, ShardingEnv, ShardMetadata
from shardrec_sharders.column_wise import ColumnWiseSharder
from shardrec_sharders.row_wise import RowWiseSharder

ENV = ShardingEnv(world_size=2, rank=0)


def ebc() -> EmbeddingBagCollection:
    table = EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=8, feature_names=["f"])
    return EmbeddingBagCollection(tables=[table], device=torch.device("meta"))


def plan(sharding: str, *shards: ShardMetadata) -> dict[str, ParameterSharding]:
    return {
        "t": ParameterSharding(
            sharding_type=sharding,
            compute_kernel="fused",
            ranks=tuple(s.rank for s in shards),
            shards=shards,
        )
    }


@pytest.mark.parametrize(
    "blocks",
    [((0, 4, 0), (5, 5, 1)), ((0, 6, 0), (5, 5, 1)), ((0, 4, 0), (4, 4, 1))],
    ids=["gap", "overlap", "short"],
)
def test_row_blocks_that_do_not_tile_the_table(blocks: tuple[tuple[int, int, int], ...]) -> None:
    shards = [ShardMetadata((offset, 0), (rows, 8), rank) for offset, rows, rank in blocks]
    with pytest.raises(
        ValueError, match=r"row-wise table 't': row blocks .* do not tile \[0, 10\)"
    ):
        RowWiseSharder(EmbeddingBagCollection).shard(
            ebc(), plan("row_wise", *shards), ENV, torch.device("cpu")
        )


def test_column_slices_that_do_not_tile_the_dimension() -> None:
    shards = [ShardMetadata((0, 0), (10, 4), 0), ShardMetadata((0, 4), (10, 3), 1)]
    with pytest.raises(
        ValueError, match=r"column-wise table 't': column slices .* do not tile \[0, 8\)"
    ):
        ColumnWiseSharder(EmbeddingBagCollection).shard(
            ebc(), plan("column_wise", *shards), ENV, torch.device("cpu")
        )


def test_a_column_slice_must_span_every_row() -> None:
    shards = [ShardMetadata((0, 0), (9, 4), 0), ShardMetadata((0, 4), (10, 4), 1)]
    with pytest.raises(ValueError, match=r"column-wise table 't': shard .* does not span all 10"):
        ColumnWiseSharder(EmbeddingBagCollection).shard(
            ebc(), plan("column_wise", *shards), ENV, torch.device("cpu")
        )
