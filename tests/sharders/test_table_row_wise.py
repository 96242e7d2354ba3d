"""Table-wise-row-wise sharding on 4 gloo processes laid out as 2 nodes of 2 (``_two_level.py``),
against the unsharded module: outputs, dense gradients, weights after steps, checkpoints."""

from __future__ import annotations

import pytest
import torch

from shardrec.distributed import ParameterSharding, ShardingEnv, ShardingPlan, ShardMetadata
from shardrec.distributed.node_groups import NodeLayout
from shardrec.distributed.sharding_plan import even_splits, table_wise
from shardrec.modules import EmbeddingBagCollection, EmbeddingCollection
from shardrec.testing import WorkerPool
from shardrec_sharders.table_row_wise import TableRowWiseSharder

from ._two_level import LOCAL, WORLD, check, dims, model, sharding

pytestmark = pytest.mark.multiprocess


def twrw(rows: int, cols: int, node: int, local: int = LOCAL) -> ParameterSharding:
    """Rows split evenly over the ``local`` ranks of ``node``."""
    ranks = range(node * local, (node + 1) * local)
    splits = even_splits(rows, local)
    return sharding(
        "table_row_wise",
        [(at, 0, n, cols, r) for r, (at, n) in zip(ranks, splits, strict=True) if n],
    )


def make_plan(spec: dict[str, str]) -> ShardingPlan:
    """``spec[table]``: ``"node0"``/``"node1"`` (table-row-wise there) or ``"tw<rank>"``."""
    plan = {}
    for name, (rows, dim) in dims("ebc").items():
        how = spec[name]
        if how.startswith("node"):
            plan[name] = twrw(rows, dim, int(how[4:]))
        else:
            plan[name] = table_wise(int(how[2:]), rows, dim)
    return ShardingPlan({"emb": plan})


SPEC = {"t0": "node0", "t1": "node1", "t2": "node0", "t3": "node1"}
SPEC_SWAPPED = {"t0": "node1", "t1": "node0", "t2": "node1", "t3": "node0"}
SPEC_MIXED = {"t0": "node1", "t1": "tw3", "t2": "node1", "t3": "tw0"}


def test_table_row_wise_matches_unsharded_on_two_nodes_of_two(dist_pool: WorkerPool) -> None:
    check(dist_pool, make_plan(SPEC), reload_plan=make_plan(SPEC))


def test_table_row_wise_mean_weighted_empty_rank_rowwise_adagrad(dist_pool: WorkerPool) -> None:
    check(
        dist_pool,
        make_plan(SPEC),
        pooling="MEAN",
        weighted=True,
        empty_rank=1,
        optimizer="rowwise_adagrad",
    )


def test_table_row_wise_beside_table_wise_in_one_module(dist_pool: WorkerPool) -> None:
    check(dist_pool, make_plan(SPEC_MIXED), empty_rank=3)


@pytest.mark.parametrize(
    "spec",
    [
        # Rank 3 holds no block (t3's one row is on rank 2), yet must return the weights' grad.
        {"t0": "node0", "t1": "node0", "t2": "node0", "t3": "node1"},
        # Node 1 holds no table at all.
        {"t0": "node0", "t1": "node0", "t2": "node0", "t3": "node0"},
    ],
    ids=["rank-without-blocks", "node-without-tables"],
)
def test_gradients_reach_weights_that_require_grad(
    dist_pool: WorkerPool, spec: dict[str, str]
) -> None:
    # check_sharding compares the per-id weights' gradient of every weighted batch.
    check(dist_pool, make_plan(spec), weighted=True, pooling="MEAN")


def test_one_node_of_three_without_local_world_size(dist_pool: WorkerPool) -> None:
    # No LOCAL_WORLD_SIZE: one node, whose group is the sharding group itself (a sub-group of the
    # test pool's four processes here).
    d = dims("ebc")
    plan = ShardingPlan({"emb": {t: twrw(*d[t], node=0, local=3) for t in d}})
    check(dist_pool, plan, world=3, local=None, empty_rank=0)


def test_two_nodes_of_one(dist_pool: WorkerPool) -> None:
    # One rank per node: the cross-node group is the sharding group, nothing is reduced inside.
    d = dims("ebc")
    nodes = {"t0": 1, "t1": 0, "t2": 1, "t3": 0}
    plan = ShardingPlan({"emb": {t: twrw(*d[t], node=nodes[t], local=1) for t in d}})
    check(dist_pool, plan, world=2, local=1, pooling="MEAN")


@pytest.mark.parametrize("spec", [SPEC_SWAPPED, SPEC_MIXED], ids=["other-nodes", "table-wise"])
def test_checkpoint_reshards(dist_pool: WorkerPool, spec: dict[str, str]) -> None:
    # Saved table-row-wise (row-wise Adagrad state too); loaded with the tables on the other
    # nodes, and partly table-wise.
    check(dist_pool, make_plan(SPEC), optimizer="rowwise_adagrad", reload_plan=make_plan(spec))


# -- plans the sharder refuses -----------------------------------------------------------------


def _shard(params: dict[str, ParameterSharding]) -> None:
    emb = model().build(seed=0).emb
    assert isinstance(emb, EmbeddingBagCollection)
    TableRowWiseSharder(local_world_size=LOCAL).shard(
        emb, params, ShardingEnv.from_local(WORLD, 0), torch.device("cpu")
    )


def test_row_blocks_across_nodes_are_refused() -> None:
    ps = sharding("table_row_wise", [(0, 0, 4, 4, 1), (4, 0, 3, 4, 2)])
    with pytest.raises(ValueError, match=r"'t0'.*ranks \[1, 2\] span nodes \[0, 1\]"):
        _shard({"t0": ps})


def test_row_blocks_that_do_not_tile_are_refused() -> None:
    ps = sharding("table_row_wise", [(0, 0, 4, 4, 0), (5, 0, 2, 4, 1)])
    with pytest.raises(ValueError, match=r"'t0'.*do not tile"):
        _shard({"t0": ps})


def test_partial_width_shards_are_refused() -> None:
    shards = (ShardMetadata((0, 0), (7, 2), 0),)
    ps = ParameterSharding(
        sharding_type="table_row_wise", compute_kernel="fused", ranks=(0,), shards=shards
    )
    with pytest.raises(ValueError, match=r"'t0'.*not full width"):
        _shard({"t0": ps})


def test_local_world_size_must_divide_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="3 ranks per node"):
        NodeLayout.from_env(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    layout = NodeLayout.from_env(4)
    assert (layout.nodes, layout.node_of(3), layout.local_rank_of(3)) == (2, 1, 1)
    assert list(layout.ranks_of_node(1)) == [2, 3]


def test_embedding_collections_are_not_offered() -> None:
    with pytest.raises(TypeError, match="EmbeddingBagCollection only"):
        TableRowWiseSharder(EmbeddingCollection)
