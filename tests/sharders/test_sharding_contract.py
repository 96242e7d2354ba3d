"""Every built-in sharded module declares the whole sharding contract (``ShardedModule``: the
pipeline split, its shards, its state-dict prefix, ``check_inputs``), and at world size 1 (no
process group: the collectives are the identity) gives the unsharded module's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
)
from shardrec.distributed import ParameterSharding, ShardingEnv, ShardMetadata
from shardrec.distributed.sharding import EmbeddingSharderBase, ShardedModule, ShardRect
from shardrec.sparse import KeyedJaggedTensor, KeyedTensor
from shardrec_sharders.column_wise import ColumnWiseSharder
from shardrec_sharders.data_parallel import DataParallelSharder
from shardrec_sharders.grid import GridSharder
from shardrec_sharders.row_wise import RowWiseSharder
from shardrec_sharders.table_column_wise import TableColumnWiseSharder
from shardrec_sharders.table_row_wise import TableRowWiseSharder
from shardrec_sharders.table_wise import TableWiseSharder

ENV = ShardingEnv.from_local(1, 0)
ROWS, DIM = 10, 8
# Column-split layouts get two slices on the one rank, so the slices' reassembly runs too.
HALVES = (
    ShardMetadata.placed(ShardRect(0, 0, ROWS, DIM // 2), 0),
    ShardMetadata.placed(ShardRect(0, DIM // 2, ROWS, DIM // 2), 0),
)
SHARDERS: dict[str, tuple[type[EmbeddingSharderBase], tuple[ShardMetadata, ...], bool]] = {
    "table_wise": (TableWiseSharder, (), True),
    "row_wise": (RowWiseSharder, (), True),
    "column_wise": (ColumnWiseSharder, HALVES, True),
    "data_parallel": (DataParallelSharder, (), True),
    "table_column_wise": (TableColumnWiseSharder, HALVES, True),
    "table_row_wise": (TableRowWiseSharder, (), False),
    "grid_shard": (GridSharder, HALVES, False),
}


def module(pooled: bool) -> nn.Module:
    if pooled:
        bags = [
            EmbeddingBagConfig(
                name="t", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f"]
            )
        ]
        return EmbeddingBagCollection(
            tables=bags, fused_params={"optimizer": "sgd", "learning_rate": 0.1}
        )
    rows = [EmbeddingConfig(name="t", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f"])]
    return EmbeddingCollection(tables=rows, fused_params={"optimizer": "sgd", "learning_rate": 0.1})


# Two-level shardings add partial sums inside a node: bags only (their sharders refuse an EC).
CASES = [(s, True) for s in SHARDERS] + [(s, False) for s, (_, _, seq) in SHARDERS.items() if seq]


@pytest.mark.parametrize(("sharding", "pooled"), CASES)
def test_a_built_in_sharded_module_keeps_the_contract(sharding: str, pooled: bool) -> None:
    sharder_type, shards, _ = SHARDERS[sharding]
    torch.manual_seed(0)
    plain = module(pooled)
    kernel = "dense" if sharding == "data_parallel" else "fused"
    ps = ParameterSharding(
        sharding_type=sharding,
        compute_kernel=kernel,
        ranks=(0,) * max(1, len(shards)),
        shards=shards,
    )
    sharded = sharder_type(type(plain)).shard(plain, {"t": ps}, ENV, torch.device("cpu"))

    assert isinstance(sharded, ShardedModule)
    assert sharded.table_key_prefix == ("embedding_bags" if pooled else "embeddings")
    assert sharded.check_inputs is True
    pieces = sharded.local_table_shards()["t"].weight
    assert sorted(p.offsets for p in pieces) == (
        [(0, 0)] if not shards else [(0, 0), (0, DIM // 2)]
    )

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([1, 9, 3, 3, 0]), lengths=torch.tensor([2, 0, 3])
    )
    got = sharded.compute_and_output_dist(sharded.input_dist(kjt).wait())
    want = plain(kjt)
    if pooled:
        assert isinstance(got, KeyedTensor)
        assert isinstance(want, KeyedTensor)
        torch.testing.assert_close(got.values(), want.values())
    else:
        assert isinstance(got, dict)
        assert isinstance(want, dict)
        torch.testing.assert_close(got["f"].values(), want["f"].values())


def test_a_plan_error_names_only_what_is_wrong() -> None:
    from shardrec.distributed.model_parallel import shard_module

    plain = module(pooled=True)
    ps = ParameterSharding(sharding_type="table_wise", compute_kernel="fused", ranks=(0,))
    sharders = [TableWiseSharder(EmbeddingBagCollection)]
    with pytest.raises(ValueError, match=r"planned tables \['zz'\] do not exist") as caught:
        shard_module(plain, {"t": ps, "zz": ps}, sharders, ENV, torch.device("cpu"))
    assert "no sharding" not in str(caught.value)
