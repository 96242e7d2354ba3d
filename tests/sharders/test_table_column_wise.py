"""Table-wise-column-wise sharding on 4 gloo processes laid out as 2 nodes of 2
(``_two_level.py``), against the unsharded module: outputs, dense gradients, weights after steps,
checkpoints; bags and sequences."""

from __future__ import annotations

import pytest
import torch

from shardrec.distributed import ParameterSharding, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import even_splits, table_wise
from shardrec.modules import EmbeddingBagCollection
from shardrec.testing import WorkerPool
from shardrec_sharders.table_column_wise import TableColumnWiseSharder

from ._two_level import LOCAL, WORLD, check, dims, model, sharding

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


# Fused SGD: row-wise Adagrad keeps a per-row state per column slice, as column-wise does.


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_table_column_wise_matches_unsharded_on_two_nodes_of_two(
    dist_pool: WorkerPool, kind: str
) -> None:
    check(dist_pool, make_plan(kind), kind=kind, reload_plan=make_plan(kind))


def test_table_column_wise_mean_weighted_empty_rank(dist_pool: WorkerPool) -> None:
    check(dist_pool, mixed_plan("ebc"), pooling="MEAN", weighted=True, empty_rank=1)


def test_checkpoint_reshards_to_table_wise(dist_pool: WorkerPool) -> None:
    check(dist_pool, make_plan("ebc"), reload_plan=mixed_plan("ebc"))


def test_slices_across_nodes_are_refused() -> None:
    emb = model().build(seed=0).emb
    assert isinstance(emb, EmbeddingBagCollection)
    ps = twcw(7, 4, [1, 2])
    with pytest.raises(ValueError, match=r"'t0'.*ranks \[1, 2\] span nodes \[0, 1\]"):
        TableColumnWiseSharder(EmbeddingBagCollection, local_world_size=LOCAL).shard(
            emb, {"t0": ps}, ShardingEnv.from_local(WORLD, 0), torch.device("cpu")
        )
