"""Grid sharding on 4 gloo processes laid out as 2 nodes of 2 (``_two_level.py``), against the
unsharded module: outputs, dense gradients, weights after steps, checkpoints.

Column slices go to nodes, each slice's rows are split across its node's ranks. The plan below
has a slice on each node (t0, t1), two slices of one table on the same node (t2: rank 2 holds a
row block of each) and one-row slices whose only block sits on one rank of the node (t3).
"""

from __future__ import annotations

import pytest
import torch

from shardrec.distributed import ParameterSharding, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import even_splits, table_wise
from shardrec.modules import EmbeddingBagCollection
from shardrec.testing import WorkerPool
from shardrec_sharders.grid import GridSharder

from ._two_level import LOCAL, WORLD, check, dims, model, sharding

pytestmark = pytest.mark.multiprocess


def grid(rows: int, columns: list[tuple[int, int, int]]) -> ParameterSharding:
    """``columns``: (col offset, cols, node) of each slice; rows split evenly in the node."""
    boxes = []
    for c0, nc, node in columns:
        ranks = range(node * LOCAL, (node + 1) * LOCAL)
        for r, (at, n) in zip(ranks, even_splits(rows, LOCAL), strict=True):
            if n:
                boxes.append((at, c0, n, nc, r))
    return sharding("grid_shard", boxes)


def grid_plan() -> ShardingPlan:
    d = dims("ebc")
    return ShardingPlan(
        {
            "emb": {
                "t0": grid(d["t0"][0], [(0, 2, 0), (2, 2, 1)]),
                "t1": grid(d["t1"][0], [(0, 3, 1), (3, 5, 0)]),
                "t2": grid(d["t2"][0], [(0, 1, 1), (1, 3, 1)]),
                "t3": grid(d["t3"][0], [(0, 1, 1), (1, 1, 0)]),
            }
        }
    )


def other_plan() -> ShardingPlan:
    """Grid beside table-wise, the slices on other nodes."""
    d = dims("ebc")
    return ShardingPlan(
        {
            "emb": {
                "t0": table_wise(2, *d["t0"]),
                "t1": grid(d["t1"][0], [(0, 4, 0), (4, 4, 1)]),
                "t2": grid(d["t2"][0], [(0, 4, 0)]),
                "t3": table_wise(1, *d["t3"]),
            }
        }
    )


# Fused SGD in the checkpoint round trips: row-wise Adagrad keeps a per-row state per column
# slice (see grid.py), which the unsharded module does not.


def test_grid_matches_unsharded_on_two_nodes_of_two(dist_pool: WorkerPool) -> None:
    check(dist_pool, grid_plan(), reload_plan=grid_plan())


def test_grid_mean_weighted_empty_rank(dist_pool: WorkerPool) -> None:
    check(dist_pool, grid_plan(), pooling="MEAN", weighted=True, empty_rank=2)


def test_grid_beside_table_wise(dist_pool: WorkerPool) -> None:
    check(dist_pool, other_plan(), empty_rank=0)


def test_checkpoint_reshards_to_grid_beside_table_wise(dist_pool: WorkerPool) -> None:
    check(dist_pool, grid_plan(), reload_plan=other_plan())


def _shard(params: dict[str, ParameterSharding]) -> None:
    emb = model().build(seed=0).emb
    assert isinstance(emb, EmbeddingBagCollection)
    GridSharder(local_world_size=LOCAL).shard(
        emb, params, ShardingEnv.from_local(WORLD, 0), torch.device("cpu")
    )


def test_a_slice_split_across_nodes_is_refused() -> None:
    ps = sharding("grid_shard", [(0, 0, 4, 2, 1), (4, 0, 3, 2, 2), (0, 2, 7, 2, 0)])
    with pytest.raises(ValueError, match=r"'t0\[:, 0:2\]'.*span nodes \[0, 1\]"):
        _shard({"t0": ps})


def test_slices_that_do_not_tile_the_columns_are_refused() -> None:
    ps = sharding("grid_shard", [(0, 0, 7, 2, 0), (0, 3, 7, 1, 2)])
    with pytest.raises(ValueError, match=r"'t0'.*column slices.*do not tile \[0, 4\)"):
        _shard({"t0": ps})
