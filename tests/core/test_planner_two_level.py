"""The two-level layouts (table-row-wise, table-column-wise, grid): how the planner cuts and
places them, how it prices grid's slices, and that the plans it makes are accepted by
DistributedModelParallel and train like the unsharded module, on 4 gloo processes as 2 nodes of 2
(``tests/sharders/_two_level.py``, through ``shardrec.testing.check_sharding``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from shardrec.distributed import ShardingEnv, ShardingPlan
from shardrec.distributed.planner import (
    EmbeddingShardingPlanner,
    ParameterConstraints,
    PlannerTable,
    Topology,
    Traffic,
    Workload,
    estimate_shard,
)
from shardrec.distributed.planner.for_dmp import live_topology
from shardrec.distributed.planner.layouts import GridLayout, TableColumnWiseLayout
from shardrec.distributed.plugins import load_sharder_registry

from ..sharders._two_level import LOCAL, WORLD, check, model

# The model's tables (t0 7x4, t1 10x8, t2 9x4, t3 1x2), each forced to one two-level type (a
# dimension of 4 is one group of 4 columns, which the planner does not cut: t0 and t2 by rows).
FORCED = {
    "t0": "table_row_wise",
    "t1": "grid_shard",
    "t2": "table_row_wise",
    "t3": "table_column_wise",
}


TABLE = PlannerTable(
    module_path="", param_name="t", num_embeddings=1003, embedding_dim=64, module_type=nn.Module
)
THREE_HOSTS = Topology(world_size=12, local_world_size=4, hbm_mem_bw=1e9)


def test_table_column_wise_cuts_up_to_a_host_of_slices() -> None:
    cuts = TableColumnWiseLayout().cuts(TABLE, THREE_HOSTS, min_partition=8)
    assert [len(c.pieces) for c in cuts] == [2, 4]  # 8 slices would pass the host's 4 ranks
    for cut in cuts:
        assert cut.groups() == (0,) * len(cut.pieces)  # one host for all
        assert all(p[0] == 0 and p[2] == 1003 for p in cut.pieces)  # every row
        assert sum(p[3] for p in cut.pieces) == 64


def test_grid_cuts_a_slice_per_host_split_by_rows_there() -> None:
    cuts = GridLayout().cuts(TABLE, THREE_HOSTS, min_partition=8)
    assert [len(set(c.groups())) for c in cuts] == [2]  # 4 slices would pass the 3 hosts
    (cut,) = cuts
    assert cut.traffic is Traffic.HOST_ROW_SPLIT
    for g in (0, 1):
        blocks = [p for p, grp in zip(cut.pieces, cut.groups(), strict=True) if grp == g]
        assert [p[1] for p in blocks] == [32 * g] * 4
        assert {p[3] for p in blocks} == {32}
        assert sum(p[2] for p in blocks) == 1003  # the slice's rows, over the host's 4 ranks
    assert GridLayout().cuts(TABLE, Topology(world_size=4), min_partition=8) == []  # one host


def test_a_grid_slice_sends_partial_sums_of_its_own_columns() -> None:
    two_hosts = Topology(world_size=4, local_world_size=2, hbm_mem_bw=1e9)
    work = Workload(batch_size=10, pooling_factor=2.0, optimizer="sgd")
    full = estimate_shard(TABLE, 500, 64, Traffic.HOST_ROW_SPLIT, two_hosts, work)
    half = estimate_shard(TABLE, 500, 32, Traffic.HOST_ROW_SPLIT, two_hosts, work)
    ids = 8 * 10 * 2 * 500 / 1003  # each peer's ids that fall in the 500 rows
    assert full.cost.to_owner == pytest.approx(ids + 4 * 10 * 64 / 2)
    assert half.cost.to_owner == pytest.approx(ids + 4 * 10 * 32 / 2)
    assert half.cost.from_owner == pytest.approx(full.cost.from_owner / 2)
    assert half.cost.owner_intra == pytest.approx(full.cost.owner_intra / 2)


def test_a_planner_without_a_topology_takes_ranks_per_host_from_the_launcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The two-level sharders read LOCAL_WORLD_SIZE; a plan for one host of all ranks would put a
    # table-row-wise table across two real hosts, which they refuse.
    env = ShardingEnv(world_size=4, rank=0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert live_topology(env, torch.device("cpu")).ranks_per_host == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # does not divide 4: one host
    assert live_topology(env, torch.device("cpu")).ranks_per_host == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert live_topology(env, torch.device("cpu")).ranks_per_host == 4


def planned() -> ShardingPlan:
    planner = EmbeddingShardingPlanner(
        Topology(world_size=WORLD, local_world_size=LOCAL, compute_device="cpu"),
        batch_size=8,
        optimizer="sgd",
        # Slices of a column or two, so these tiny tables can be cut at all.
        constraints={
            t: ParameterConstraints(sharding_types=[kind], min_partition=1)
            for t, kind in FORCED.items()
        },
    )
    return planner.plan(model().build(seed=0), load_sharder_registry().sharders())


def test_planner_cuts_two_level_tables_as_their_sharders_want() -> None:
    plan = planned().plan["emb"]
    for table, kind in FORCED.items():
        assert plan[table].sharding_type == kind
    # Table-row-wise and table-column-wise: one node, each shard on a rank of its own.
    for table in ("t0", "t2", "t3"):
        assert len({s.rank // LOCAL for s in plan[table].shards}) == 1, plan[table]
        assert len({s.rank for s in plan[table].shards}) == len(plan[table].shards)
    assert sorted(s.sizes for s in plan["t0"].shards) == [(3, 4), (4, 4)]
    assert sorted(s.offsets[1] for s in plan["t3"].shards) == [0, 1]  # two slices of a column
    # Grid: two column slices of t1 (dim 8), each on a node of its own, split there by rows.
    slices: dict[tuple[int, int], set[int]] = {}
    for s in plan["t1"].shards:
        slices.setdefault((s.offsets[1], s.sizes[1]), set()).add(s.rank // LOCAL)
    assert sorted(slices) == [(0, 4), (4, 4)]
    assert sorted(n for ns in slices.values() for n in ns) == [0, 1]


@pytest.mark.multiprocess
def test_a_planned_two_level_plan_trains_like_the_unsharded_module(dist_pool: Any) -> None:
    check(dist_pool, planned())
