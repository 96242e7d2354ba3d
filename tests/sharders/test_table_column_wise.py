"""Table-wise-column-wise sharding on 4 gloo processes laid out as 2 nodes of 2
(``_two_nodes.py``), against the unsharded module: outputs, dense gradients, weights after steps,
checkpoints; bags and sequences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shardrec.distributed import ParameterSharding, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import even_splits, table_wise
from shardrec.modules import EmbeddingBagCollection
from shardrec_sharders.table_column_wise import TableColumnWiseSharder

from ._reference import ebc_configs
from ._two_nodes import LOCAL, TABLES, WORLD, check, check_checkpoint, dims, sharding

pytestmark = pytest.mark.multiprocess


def twcw(rows: int, cols: int, ranks: list[int]) -> ParameterSharding:
    splits = even_splits(cols, len(ranks))
    return sharding(
        "table_column_wise", [(0, at, rows, n, r) for r, (at, n) in zip(ranks, splits, strict=True)]
    )


# t2's slices are in reverse rank order; t3's two slices are both on rank 3.
RANKS = {"t0": [0, 1], "t1": [2, 3], "t2": [1, 0], "t3": [3, 3]}


def make_plan(kind: str, ranks: dict[str, list[int]] = RANKS) -> ShardingPlan:
    return ShardingPlan(
        {"emb": {t: twcw(rows, dim, ranks[t]) for t, (rows, dim) in dims(kind).items()}}
    )


def mixed_plan(kind: str) -> ShardingPlan:
    d = dims(kind)
    ranks = {"t1": [0, 1], "t2": [3, 2]}
    plan = {t: twcw(*d[t], ranks[t]) for t in ranks}
    plan["t0"] = table_wise(3, *d["t0"])
    plan["t3"] = table_wise(0, *d["t3"])
    return ShardingPlan({"emb": plan})


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_table_column_wise_matches_unsharded_on_two_nodes_of_two(dist_pool: Any, kind: str) -> None:
    check(dist_pool, make_plan(kind), kind=kind)


def test_table_column_wise_mean_weighted_empty_rank(dist_pool: Any) -> None:
    check(dist_pool, mixed_plan("ebc"), pooling="MEAN", weighted=True, empty_rank=1)


def test_checkpoint_round_trip_and_reshard(dist_pool: Any, tmp_path: Path) -> None:
    check_checkpoint(
        dist_pool,
        tmp_path / "ck",
        make_plan("ebc"),
        [make_plan("ebc"), mixed_plan("ebc")],
        optimizer="sgd",
    )


def test_slices_across_nodes_are_refused() -> None:
    ebc = EmbeddingBagCollection(ebc_configs(TABLES[:1]))
    ps = twcw(7, 4, [1, 2])
    with pytest.raises(ValueError, match=r"'t0'.*ranks \[1, 2\] span nodes \[0, 1\]"):
        TableColumnWiseSharder(EmbeddingBagCollection, local_world_size=LOCAL).shard(
            ebc, {"t0": ps}, ShardingEnv.from_local(WORLD, 0), torch.device("cpu")
        )
