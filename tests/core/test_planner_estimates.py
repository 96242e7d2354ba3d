"""The planner's estimates, against numbers computed by hand from its documented formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from shardrec.distributed.planner import (
    OPTIMIZER_STATE,
    EmbeddingShardingPlanner,
    ParameterConstraints,
    PlannerTable,
    Topology,
    Traffic,
    Workload,
    estimate_shard,
)
from shardrec.distributed.planner.estimators import optimizer_state_bytes
from shardrec.distributed.planner.layouts import ColumnWiseLayout, RowWiseLayout, even_splits
from shardrec.kernels import OptimizerType

# Round numbers so that the hand computations below stay readable.
TOPO = Topology(
    world_size=4,
    compute_device="cuda",
    hbm_cap=10**9,
    hbm_mem_bw=1e9,
    intra_host_bw=1e8,
    inter_host_bw=1e7,
    bwd_compute_multiplier=2.0,
)
TABLE = PlannerTable(
    module_path="ebc",
    param_name="t",
    num_embeddings=1000,
    embedding_dim=16,
    module_type=nn.Module,
    num_features=2,
)
SGD = Workload(batch_size=10, pooling_factor=3.0, optimizer="sgd")


def test_table_wise_shard_matches_hand_computation() -> None:
    est = estimate_shard(TABLE, 1000, 16, Traffic.ALL_IDS, TOPO, SGD)
    ids = 10 * 4 * 2 * 3  # B·W·F·P = 240
    out = 10 * 4 * 2 * 16  # B·W·F·cols = 1280
    assert est.weights == 1000 * 16 * 4
    assert est.optimizer_state == 0
    assert est.io == ids * 8 + 2 * out * 4  # 1920 + 10240
    assert est.fwd_compute == pytest.approx((ids * 16 + out) * 4 / 1e9)
    assert est.bwd_compute == pytest.approx(2 * est.fwd_compute)
    # Each peer sends its 60 ids and, backward, its 320-element output gradient; gets 320 back.
    assert est.cost.to_owner == 8 * 60 + 4 * 320
    assert est.cost.from_owner == 4 * 320
    assert est.cost.read_bytes == ids * 16 * 4
    # One host of 4 ranks: the owner's 3 peers are all inside it (intra-host bandwidth).
    assert est.perf == pytest.approx(est.fwd_compute * 3 + 3 * (8 * 60 + 4 * 320) / 1e8)
    assert est.storage == 64000 + 12160


def test_row_wise_shard_sees_its_share_of_ids_and_sends_full_width_partials() -> None:
    est = estimate_shard(TABLE, 250, 16, Traffic.ROW_SPLIT, TOPO, SGD)
    ids = 240 * 250 / 1000  # 60 ids fall in a quarter of the rows
    out = 10 * 4 * 2 * 16  # partial sums over the whole dimension for the global batch
    assert est.weights == 250 * 16 * 4
    assert est.io == round(ids * 8 + 2 * out * 4)
    assert est.cost.to_owner == pytest.approx(8 * 15 + 4 * 320)  # 15 ids per peer
    assert est.cost.from_owner == 4 * 320


def test_column_wise_shard_prices_only_its_columns() -> None:
    est = estimate_shard(TABLE, 1000, 8, Traffic.ALL_IDS, TOPO, SGD)
    assert est.weights == 1000 * 8 * 4
    assert est.cost.from_owner == 4 * (10 * 2 * 8)
    assert est.cost.to_owner == 8 * 60 + 4 * (10 * 2 * 8)  # every id, half the columns


def test_data_parallel_replica_allreduces_its_gradient() -> None:
    est = estimate_shard(TABLE, 1000, 16, Traffic.REPLICATED, TOPO, SGD)
    weights = 1000 * 16 * 4
    ids = 10 * 2 * 3  # local batch only
    out = 10 * 2 * 16
    assert est.cost.to_owner == est.cost.from_owner == 0.0
    # One host of 4: reduce-scatter + all-gather inside it, 2·3/4 of the gradient each way.
    assert est.cost.allreduce_intra == pytest.approx(2 * 3 / 4 * weights)
    assert est.cost.allreduce_inter == 0.0
    assert est.perf == pytest.approx(3 * est.fwd_compute + 2 * 3 / 4 * weights / 1e8)
    assert est.io == ids * 8 + 2 * out * 4 + weights  # plus the dense gradient


def test_cross_host_peers_use_the_inter_host_bandwidth() -> None:
    two_hosts = Topology(
        world_size=4, local_world_size=2, hbm_mem_bw=1e9, intra_host_bw=1e8, inter_host_bw=1e7
    )
    est = estimate_shard(TABLE, 1000, 16, Traffic.ALL_IDS, two_hosts, SGD)
    # One peer on the owner's host, two on the other host.
    per_peer = 8 * 60 + 4 * 320
    assert est.perf == pytest.approx(3 * est.fwd_compute + per_peer / 1e8 + 2 * per_peer / 1e7)


def test_table_row_wise_reduces_inside_the_host_before_crossing() -> None:
    two_hosts = Topology(
        world_size=4, local_world_size=2, hbm_mem_bw=1e9, intra_host_bw=1e8, inter_host_bw=1e7
    )
    est = estimate_shard(TABLE, 500, 16, Traffic.HOST_ROW_SPLIT, two_hosts, SGD)
    # Half the rows: 30 ids per peer; the pooled row (320 elements) crosses once, half per owner.
    assert est.cost.to_owner == pytest.approx(8 * 30 + 4 * 320 / 2)
    assert est.cost.from_owner == pytest.approx(4 * 320 / 2)
    # Reduce-scatter of the partial sums of all 4 ranks' samples, and the all-gather backward.
    assert est.cost.owner_intra == pytest.approx(2 * (1 / 2) * 4 * 1280)


def test_single_rank_has_no_comms() -> None:
    est = estimate_shard(TABLE, 1000, 16, Traffic.ALL_IDS, Topology(world_size=1), SGD)
    assert est.perf == pytest.approx(est.fwd_compute + est.bwd_compute)


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ("sgd", 0),
        ("rowwise_adagrad", 1000 * 4),  # one float per row
        ("adagrad", 1000 * 16 * 4),  # one float per weight
        ("adam", 2 * 1000 * 16 * 4),  # two floats per weight: 2x the weights
        ("exact_row_wise_adagrad", 1000 * 4),  # FBGEMM's spelling, parsed once
        (None, 0),  # no fused optimizer
    ],
)
def test_optimizer_state(optimizer: str | None, expected: int) -> None:
    workload = Workload(10, 3.0, optimizer)  # type: ignore[arg-type]  # a user's string
    assert workload.optimizer is None or isinstance(workload.optimizer, OptimizerType)
    assert optimizer_state_bytes(workload.optimizer, 1000, 16) == expected
    est = estimate_shard(TABLE, 1000, 16, Traffic.ALL_IDS, TOPO, workload)
    assert est.optimizer_state == expected


def test_every_fused_optimizer_has_a_state_size() -> None:
    assert set(OPTIMIZER_STATE) == set(OptimizerType)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Workload(10, 3.0, "lion"),
        lambda: ParameterConstraints(optimizer="lion"),
        lambda: EmbeddingShardingPlanner(optimizer="lion"),
    ],
)
def test_an_unknown_optimizer_is_refused_naming_the_valid_ones(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=r"'lion'.*sgd, exact_adagrad, rowwise_adagrad, adam"):
        build()


def test_sequence_table_outputs_one_row_per_id() -> None:
    seq = PlannerTable(
        module_path="ec",
        param_name="s",
        num_embeddings=100,
        embedding_dim=8,
        module_type=nn.Module,
        pooled=False,
    )
    est = estimate_shard(seq, 100, 8, Traffic.ALL_IDS, TOPO, Workload(10, 2.0, "sgd"))
    ids = 10 * 4 * 1 * 2
    assert est.io == ids * 8 + 2 * ids * 8 * 4


def test_layouts_cut_uneven_rows_and_columns() -> None:
    assert even_splits(10, 4) == [(0, 3), (3, 3), (6, 2), (8, 2)]
    odd = PlannerTable(
        module_path="", param_name="t", num_embeddings=10, embedding_dim=64, module_type=nn.Module
    )
    (rw,) = RowWiseLayout().cuts(odd, TOPO, 32)
    assert [p[2] for p in rw.pieces] == [3, 3, 2, 2]
    assert rw.ranks == (0, 1, 2, 3)
    cws = ColumnWiseLayout().cuts(odd, TOPO, 16)
    assert [len(c.pieces) for c in cws] == [2, 4]
    assert sum(p[3] for p in cws[1].pieces) == 64
    # As many column shards as the ranks and the narrowest slice allow, in multiples of 4 columns.
    wide = Topology(world_size=64)
    table = PlannerTable(
        module_path="", param_name="t", num_embeddings=10, embedding_dim=100, module_type=nn.Module
    )
    cuts = ColumnWiseLayout().cuts(table, wide, 8)
    assert [len(c.pieces) for c in cuts] == [2, 4, 8]
    assert all(p[3] % 4 == 0 for c in cuts for p in c.pieces)
    assert [p[3] for p in cuts[2].pieces] == [16, 12, 12, 12, 12, 12, 12, 12]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="local_world_size=3"):
        Topology(world_size=4, local_world_size=3)
    with pytest.raises(ValueError, match="pooling_factor"):
        ParameterConstraints(pooling_factor=0)
    with pytest.raises(TypeError, match="sharding_types"):
        ParameterConstraints(sharding_types="table_wise")


def test_row_wise_partial_sums_take_the_reduce_scatter_bandwidth_when_given() -> None:
    slow = Topology(
        world_size=4, hbm_mem_bw=1e9, intra_host_bw=1e8, inter_host_bw=1e8, reduce_scatter_bw=1e7
    )
    est = estimate_shard(TABLE, 250, 16, Traffic.ROW_SPLIT, slow, SGD)
    # Partial sums of 10 samples x 2 features x 16 columns to each of 3 peers, and their gradients
    # back: at 1e7 B/s, not 1e8.
    partials = 4 * 10 * 2 * 16
    assert est.cost.collective_extra == pytest.approx(2 * 3 * partials * (1 / 1e7 - 1 / 1e8))
    plain = estimate_shard(TABLE, 250, 16, Traffic.ROW_SPLIT, TOPO, SGD)
    assert plain.cost.collective_extra == 0.0
    assert est.perf == pytest.approx(
        est.fwd_compute + est.bwd_compute + 3 * est.cost.to_owner / 1e8 + est.cost.collective_extra
    )
    # Table-row-wise reduce-scatters (and all-gathers) inside the host: the same bandwidth.
    trw = estimate_shard(TABLE, 250, 16, Traffic.HOST_ROW_SPLIT, slow, SGD)
    assert trw.cost.owner_intra > 0
    assert trw.cost.collective_extra == pytest.approx(trw.cost.owner_intra * (1 / 1e7 - 1 / 1e8))
    # Table-wise outputs go by all-to-all: unaffected.
    tw = estimate_shard(TABLE, 1000, 16, Traffic.ALL_IDS, slow, SGD)
    assert tw.cost.collective_extra == 0.0
    with pytest.raises(ValueError, match="reduce_scatter_bw"):
        Topology(world_size=2, reduce_scatter_bw=0.0)


def test_per_id_costs_fall_on_the_owner_and_on_every_sender_of_a_row_split() -> None:
    route, receive = 1e-6, 1e-7
    topo = Topology(
        world_size=4,
        hbm_mem_bw=1e9,
        intra_host_bw=1e8,
        inter_host_bw=1e8,
        route_cost_per_id=route,
        receive_cost_per_id=receive,
    )
    plain = Topology(world_size=4, hbm_mem_bw=1e9, intra_host_bw=1e8, inter_host_bw=1e8)
    # Row-wise, a quarter of the rows: each rank sends it 10 x 2 x 3 / 4 ids and buckets each of
    # them; the owner receives that from 4 ranks.
    rw = estimate_shard(TABLE, 250, 16, Traffic.ROW_SPLIT, topo, SGD)
    rw0 = estimate_shard(TABLE, 250, 16, Traffic.ROW_SPLIT, plain, SGD)
    assert rw.cost.sender_compute == pytest.approx(15 * route)
    assert rw.fwd_compute == pytest.approx(rw0.fwd_compute + 4 * 15 * receive)
    assert rw.bwd_compute == rw0.bwd_compute  # laying out ids is forward work
    # The backward's per-id cost: on each id the owner looks up.
    slow_bwd = Topology(world_size=4, hbm_mem_bw=1e9, backward_cost_per_id=1e-6)
    rw_bwd = estimate_shard(TABLE, 250, 16, Traffic.ROW_SPLIT, slow_bwd, SGD)
    assert rw_bwd.bwd_compute == pytest.approx(rw0.bwd_compute + 4 * 15 * 1e-6)
    assert rw_bwd.fwd_compute == rw0.fwd_compute
    # Table-wise ids need no routing: only the owner's per-id cost.
    tw = estimate_shard(TABLE, 1000, 16, Traffic.ALL_IDS, topo, SGD)
    assert tw.cost.sender_compute == 0.0
    assert tw.cost.collectives == 4
    # A replica receives nothing.
    dp = estimate_shard(TABLE, 1000, 16, Traffic.REPLICATED, topo, SGD)
    dp0 = estimate_shard(TABLE, 1000, 16, Traffic.REPLICATED, plain, SGD)
    assert dp.fwd_compute == dp0.fwd_compute
    for name in (
        "collective_latency",
        "route_cost_per_id",
        "receive_cost_per_id",
        "backward_cost_per_id",
    ):
        with pytest.raises(ValueError, match=name):
            Topology(world_size=2, **{name: -1.0})


def test_output_costs_fall_on_the_owner_per_row_and_on_every_receiver_per_byte() -> None:
    row, copy = 1e-6, 1e-9

    def four(local: int = 4, row: float = 0.0, copy: float = 0.0) -> Topology:
        return Topology(
            world_size=4,
            local_world_size=local,
            hbm_mem_bw=1e9,
            intra_host_bw=1e8,
            inter_host_bw=1e8,
            output_cost_per_row=row,
            output_copy_cost_per_byte=copy,
        )

    topo, plain = four(row=row, copy=copy), four()
    cases = (
        # (rows, cols, traffic, pooled rows on the owner, bytes each rank copies)
        # Table-wise: 10 samples x 2 features from each of 4 senders; each rank copies its
        # 10 x 2 x 16 fp32 output (1280 bytes) into the module's output.
        (1000, 16, Traffic.ALL_IDS, 80, 1280),
        # Column-wise, an 8-column slice: the same rows, half the bytes.
        (1000, 8, Traffic.ALL_IDS, 80, 640),
        # Row-wise: 80 partial-sum rows; the reduce-scatter writes the output in place.
        (250, 16, Traffic.ROW_SPLIT, 80, 0),
        # A replica pools its own 10 x 2 rows and its lookup is the output.
        (1000, 16, Traffic.REPLICATED, 20, 0),
    )
    for rows, cols, traffic, pooled_rows, copied in cases:
        est = estimate_shard(TABLE, rows, cols, traffic, topo, SGD)
        est0 = estimate_shard(TABLE, rows, cols, traffic, plain, SGD)
        assert est.bwd_compute == pytest.approx(est0.bwd_compute + pooled_rows * row), traffic
        assert est.fwd_compute == est0.fwd_compute
        assert est.cost.sender_compute == pytest.approx(copied * copy), traffic
    # Table-row-wise on hosts of 2: each of the 2 shards' sums crosses as half of a 1280-byte row.
    two_hosts = four(local=2, copy=copy)
    trw = estimate_shard(TABLE, 500, 16, Traffic.HOST_ROW_SPLIT, two_hosts, SGD)
    assert trw.cost.sender_compute == pytest.approx(640 * copy)
    # On one host its reduce-scatter writes the output in place, as row-wise's does.
    one_host = estimate_shard(TABLE, 250, 16, Traffic.HOST_ROW_SPLIT, topo, SGD)
    assert one_host.cost.sender_compute == 0.0
    # A sequence table's rows are its ids' (priced per id and per byte already): nothing added.
    seq = PlannerTable(
        module_path="ec",
        param_name="s",
        num_embeddings=1000,
        embedding_dim=16,
        module_type=nn.Module,
        num_features=2,
        pooled=False,
    )
    est = estimate_shard(seq, 1000, 16, Traffic.ALL_IDS, topo, SGD)
    est0 = estimate_shard(seq, 1000, 16, Traffic.ALL_IDS, plain, SGD)
    assert est.bwd_compute == est0.bwd_compute
    assert est.cost.sender_compute == 0.0
    with pytest.raises(ValueError, match="output_cost_per_row"):
        Topology(world_size=2, output_cost_per_row=-1.0)
    with pytest.raises(ValueError, match="output_copy_cost_per_byte"):
        Topology(world_size=2, output_copy_cost_per_byte=-1.0)
