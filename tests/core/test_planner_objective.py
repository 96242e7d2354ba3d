"""The planner's objective: the slowest rank's compute plus communication (each link class at its
own bandwidth), then memory and the other ranks' load; column-wise with as many shards as pay;
table-row-wise placed on the host that suits it; what `dlrm plan` reads in the report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from torch import nn

from shardrec.distributed.planner import (
    Cut,
    EmbeddingShardingPlanner,
    ParameterConstraints,
    PlannerError,
    PlannerTable,
    ShardingOption,
    ShardSpec,
    Topology,
    Traffic,
)
from shardrec.distributed.planner.rank_model import evaluate
from shardrec.distributed.planner.types import ShardCost

from .test_planner_plan import CRITEO_1TB_40M, FakeSharder, Model, configs

# The MLPerf DLRM-DCNv2 multi-hot sizes (ids per sample of each table).
POOLING = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
SHARDED = ("table_wise", "row_wise", "column_wise")


def test_rank_model_adds_owner_and_peer_traffic_per_link_class() -> None:
    # Two hosts of two ranks; one shard on rank 0: each peer sends it 100 bytes, gets 10 back.
    topo = Topology(world_size=4, local_world_size=2, intra_host_bw=1e3, inter_host_bw=1e2)
    table = PlannerTable(
        module_path="", param_name="t", num_embeddings=4, embedding_dim=4, module_type=nn.Module
    )
    cost = ShardCost(compute=0.5, read_bytes=64, to_owner=100, from_owner=10)
    option = ShardingOption(
        table=table,
        sharding_type="table_wise",
        compute_kernel="fused",
        shards=(ShardSpec(0, 0, 4, 4, 0, 0.0, 0, cost),),
        fixed_ranks=False,
        storage_kind="hbm",
    )
    zeros = np.zeros(4, dtype=np.int64)
    load = evaluate([option], topo, zeros, zeros)
    # Rank 0 receives 100 from its host peer (rank 1) and 2 x 100 across hosts; sends 10 / 2 x 10.
    assert (load.received_intra[0], load.received_inter[0]) == (100, 200)
    assert (load.sent_intra[0], load.sent_inter[0]) == (10, 20)
    assert (load.sent_intra[1], load.sent_inter[1]) == (100, 0)
    assert load.sent_inter[2] == load.sent_inter[3] == 100
    assert load.perf[0] == pytest.approx(0.5 + 100 / 1e3 + 200 / 1e2)
    assert load.perf[2] == pytest.approx(100 / 1e2)
    assert (load.step, load.slowest) == (load.perf[0], 0)
    assert load.read[0] == 64


def _mlperf(world_size: int) -> EmbeddingShardingPlanner:
    topo = Topology(world_size=world_size, local_world_size=8, hbm_cap=80 * 10**9)
    constraints = {
        f"t{i}": ParameterConstraints(pooling_factor=float(p)) for i, p in enumerate(POOLING)
    }
    return EmbeddingShardingPlanner(topo, batch_size=8192, constraints=constraints)


def test_mlperf_on_8_ranks_balances_memory_and_rows_read() -> None:
    planner = _mlperf(8)
    planner.plan(Model(configs(CRITEO_1TB_40M, dim=128)), [FakeSharder(SHARDED)])
    report = planner.last_report
    assert report is not None
    hbm = [r.hbm for r in report.ranks]
    read = [r.read for r in report.ranks]
    # The old objective put two 40M-row tables on one rank (41 GB); now no rank holds much more
    # than its share of memory or of the rows read.
    assert max(hbm) <= 1.1 * sum(hbm) / 8
    assert max(read) <= 1.1 * sum(read) / 8


def test_mlperf_on_64_ranks_uses_every_rank_and_splits_the_hot_table() -> None:
    planner = _mlperf(64)
    plan = planner.plan(Model(configs(CRITEO_1TB_40M, dim=128)), [FakeSharder(SHARDED)])
    report = planner.last_report
    assert report is not None
    assert sum(1 for r in report.ranks if r.shards) >= 56  # the old plan left 34 ranks idle
    hot = plan.plan["sparse"]["t20"]  # 40M rows, 100 ids per sample
    assert len(set(hot.ranks)) >= 8
    read = [r.read for r in report.ranks]
    assert max(read) <= 5 * sum(read) / 64  # the old plan: 7.5x the mean on 30 ranks


class HostRowSharder(FakeSharder):
    def __init__(self) -> None:
        super().__init__(types=["table_row_wise"])


def test_table_row_wise_tables_go_to_different_hosts() -> None:
    model = Model(configs([4_000_000, 4_000_000], dim=64))
    planner = EmbeddingShardingPlanner(
        Topology(world_size=16, local_world_size=8, hbm_cap=80 * 10**9),
        constraints={
            "t0": ParameterConstraints(sharding_types=["table_row_wise"], pooling_factor=20),
            "t1": ParameterConstraints(sharding_types=["table_row_wise"], pooling_factor=20),
        },
    )
    plan = planner.plan(model, [FakeSharder(), HostRowSharder()]).plan["sparse"]
    hosts = [{r // 8 for r in plan[t].ranks} for t in ("t0", "t1")]
    assert all(len(h) == 1 for h in hosts)
    assert hosts[0] != hosts[1]
    assert [s.rank % 8 for s in plan["t0"].shards] == list(range(8))


def test_report_shows_rows_read_bytes_sent_and_the_step() -> None:
    from shardrec.modules import EmbeddingBagCollection

    tables = configs([1000, 50_000], dim=32)
    ebc = EmbeddingBagCollection(tables, device="meta", fused_params={"optimizer": "adam"})
    planner = EmbeddingShardingPlanner(Topology(world_size=16, local_world_size=8))
    planner.plan(ebc, [FakeSharder(module_type=EmbeddingBagCollection)])
    report = planner.last_report
    assert report is not None
    text = str(report)
    for column in ("read (GB)", "sent intra (MB)", "sent inter (MB)", "step (ms)"):
        assert column in text
    assert f"estimated step: {report.step * 1e3:.3f} ms" in text
    assert "not offered" not in text  # the data-parallel sharder applies fused Adam
    busiest = max(report.ranks, key=lambda r: r.perf)
    assert busiest.perf == pytest.approx(busiest.compute + busiest.comm)
    assert any(r.sent_inter > 0 for r in report.ranks)  # two hosts: some bytes cross


class TooManyPieces:
    """A plugin layout that asks for one host but cuts more pieces than a host has ranks."""

    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> list[Cut]:
        pieces = tuple((i, 0, 1, table.embedding_dim) for i in range(table.num_embeddings))
        return [Cut(pieces, Traffic.HOST_ROW_SPLIT, None, one_host=True)]


class OneHostPlugin(FakeSharder):
    def __init__(self) -> None:
        super().__init__(types=["per_host"])

    def planner_layout(self, sharding_type: str) -> TooManyPieces:
        return TooManyPieces()


def test_a_one_host_layout_with_more_pieces_than_ranks_is_named() -> None:
    planner = EmbeddingShardingPlanner(
        Topology(world_size=4, local_world_size=2, compute_device="cpu"),
        constraints={"t0": ParameterConstraints(sharding_types=["per_host"])},
    )
    with pytest.raises(PlannerError, match=r"'sparse.t0'.*3 pieces for one host of 2 ranks"):
        planner.plan(Model(configs([3])), [FakeSharder(), OneHostPlugin()])


ALL_TYPES = (
    "data_parallel",
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "table_column_wise",
    "grid_shard",
)


def test_mlperf_on_64_ranks_beats_the_two_level_plan_on_every_rank_figure() -> None:
    # The plan TorchRec makes here: the 8 tables of 400K rows or more table-row-wise (a host
    # each), the rest data-parallel. The planner's own plan, every type offered, must be no worse
    # on its busiest rank by more than 10% in memory and bytes sent across hosts, read fewer rows
    # and take a faster step.
    model = Model(configs(CRITEO_1TB_40M, dim=128))
    two_level = _mlperf(64)
    for i, rows in enumerate(CRITEO_1TB_40M):
        kind = "table_row_wise" if rows >= 400_000 else "data_parallel"
        two_level.constraints[f"t{i}"] = ParameterConstraints(
            pooling_factor=float(POOLING[i]), sharding_types=[kind]
        )
    two_level.plan(model, [FakeSharder(ALL_TYPES)])
    planner = _mlperf(64)
    planner.plan(model, [FakeSharder(ALL_TYPES)])
    theirs, ours = two_level.last_report, planner.last_report
    assert theirs is not None
    assert ours is not None

    assert max(r.sent_inter for r in ours.ranks) <= 1.1 * max(r.sent_inter for r in theirs.ranks)
    assert max(r.hbm for r in ours.ranks) <= 1.1 * max(r.hbm for r in theirs.ranks)
    assert max(r.read for r in ours.ranks) < max(r.read for r in theirs.ranks)
    assert ours.step < theirs.step
    assert "kept the plan grown from the one that sends fewest bytes across hosts" in str(ours)


def test_a_fixed_step_overhead_moves_the_estimate_not_the_plan() -> None:
    model = Model(configs([50_000, 2_000_000], dim=32))
    plans, steps = [], []
    for overhead in (0.0, 0.004):
        topo = Topology(world_size=8, local_world_size=4, step_overhead=overhead)
        planner = EmbeddingShardingPlanner(topo)
        plans.append(planner.plan(model, [FakeSharder(ALL_TYPES)]))
        assert planner.last_report is not None
        steps.append(planner.last_report.step)
    assert plans[0].plan == plans[1].plan
    assert steps[1] == pytest.approx(steps[0] + 0.004)
    with pytest.raises(ValueError, match="step_overhead"):
        Topology(world_size=2, step_overhead=-1.0)


def _forced_step(types: Sequence[str], **costs: float) -> tuple[float, object]:
    topo = Topology(world_size=4, compute_device="cpu", **costs)
    planner = EmbeddingShardingPlanner(
        topo,
        constraints={
            f"t{i}": ParameterConstraints(sharding_types=[kind]) for i, kind in enumerate(types)
        },
    )
    plan = planner.plan(Model(configs([50_000] * len(types))), [FakeSharder(ALL_TYPES)])
    assert planner.last_report is not None
    return planner.last_report.step, plan.plan


def test_collective_latency_counts_each_module_and_sharding_type_once() -> None:
    latency = 0.001
    for types, collectives in (
        (["table_wise"], 4),
        (["table_wise", "table_wise", "table_wise"], 4),
        (["table_wise", "row_wise"], 8),
        (["data_parallel", "table_row_wise"], 2 + 6),
    ):
        step, plan = _forced_step(types)
        slow, slow_plan = _forced_step(types, collective_latency=latency)
        assert slow_plan == plan
        assert slow == pytest.approx(step + collectives * latency)


def test_row_split_routing_falls_on_every_rank() -> None:
    # Two row-wise tables: every rank buckets all of their ids, 512 samples x 1 id each.
    step, plan = _forced_step(["row_wise", "row_wise"])
    slow, slow_plan = _forced_step(["row_wise", "row_wise"], route_cost_per_id=1e-6)
    assert slow_plan == plan
    assert slow == pytest.approx(step + 2 * 512 * 1e-6)


def test_output_costs_add_the_owners_rows_and_every_ranks_copy_to_the_step() -> None:
    # One table-wise table, 512 samples per rank: its owner pools 512 rows for each of the 4
    # ranks, and copies (like every rank) its 512 x 16 fp32 output; the owner is the slowest.
    step, plan = _forced_step(["table_wise"])
    slow, slow_plan = _forced_step(
        ["table_wise"], output_cost_per_row=1e-6, output_copy_cost_per_byte=1e-9
    )
    assert slow_plan == plan
    assert slow == pytest.approx(step + 4 * 512 * 1e-6 + 512 * 16 * 4 * 1e-9)
