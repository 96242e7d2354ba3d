"""The planner counts what sharders keep on ranks beside the shards: managed tables' id maps.

A managed table's map and policy buffers (slots, row slots, last reads, reads, free rows,
counters, the admission sketch) live on the rank that owns each of its buckets, whatever the
sharding of the table's rows. The planner adds them to those ranks' memory: the estimate equals
the bytes of the buffers the sharded module holds on each rank (measured under
DistributedModelParallel on two gloo processes), a map too large for its rank is refused with an
error naming the rank and the table, and a map that leaves its rank too little room moves the
other tables' shards elsewhere. A third party's sharder declares its own state the same way
(:class:`HasRankState`); plans of models without such state are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv
from shardrec.distributed.planner import (
    EmbeddingShardingPlanner,
    HasRankState,
    ParameterConstraints,
    PlannerError,
    PlanReport,
    RankState,
    Topology,
    tables_of,
)
from shardrec.distributed.plugins import load_sharder_registry
from shardrec.distributed.sharder_index import SharderIndex
from shardrec.distributed.types import ModuleSharder, ParameterSharding, ShardingPlan
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_admission import CountThresholdAdmission
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec_sharders.managed_collision import (
    ManagedCollisionSharder,
    ShardedManagedCollisionEmbeddings,
)

MiB = 1 << 20
# t0 in 3 buckets, t1 in one: buckets t0[0], t0[1], t0[2], t1[0] go to ranks 0, 1, 0, 1 of two.
BUCKETS = {"t0": 3, "t1": 1}


class Model(nn.Module):
    """A managed module beside a plain EBC (``ebc`` None: the managed module alone)."""

    def __init__(self, mc: nn.Module, ebc: nn.Module | None = None) -> None:
        super().__init__()
        self.mc = mc
        self.ebc = ebc if ebc is not None else nn.Identity()

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out, _ = self.mc(kjt)
        assert isinstance(out, KeyedTensor)
        return out.values().sum()


def managed(
    rows: Mapping[str, int],
    dim: int = 8,
    buckets: int | Mapping[str, int] = 1,
    device: str = "cpu",
) -> ManagedCollisionEmbeddingBagCollection:
    """Managed tables of ``rows`` (t1 with a count-threshold admission: a sketch too)."""
    configs = [
        EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=dim, feature_names=[f"f_{n}"])
        for n, r in rows.items()
    ]
    modules = {
        c.name: MCHManagedCollisionModule(
            c.num_embeddings,
            device=device,
            admission=CountThresholdAdmission(threshold=2) if c.name == "t1" else None,
            name=c.name,
        )
        for c in configs
    }
    mcc = ManagedCollisionCollection(modules, configs, num_buckets=buckets)
    ebc = EmbeddingBagCollection(configs, device=torch.device(device))
    return ManagedCollisionEmbeddingBagCollection(ebc, mcc)


def buffer_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages under ``module``'s buffers: what the rank really holds."""
    seen: dict[int, int] = {}
    for buffer in module.buffers():
        storage = buffer.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def report_of(planner: EmbeddingShardingPlanner) -> PlanReport:
    assert planner.last_report is not None
    return planner.last_report


def sharders() -> list[ModuleSharder]:
    return list(load_sharder_registry().sharders())


def cpu(world: int, ddr: int | None = None) -> Topology:
    if ddr is None:
        return Topology(world_size=world, compute_device="cpu")
    return Topology(world_size=world, compute_device="cpu", ddr_cap=ddr)


# ---- the estimate is the buffers ---------------------------------------------------------------


def test_one_rank_holds_every_map_and_the_estimate_is_their_bytes() -> None:
    assert isinstance(ManagedCollisionSharder(ManagedCollisionEmbeddingBagCollection), HasRankState)
    model = Model(managed({"t0": 1000, "t1": 500}, buckets=BUCKETS))
    planner = EmbeddingShardingPlanner(cpu(1))
    planner.plan(model, sharders())
    report = report_of(planner)
    maps = model.mc.managed_collision_collection
    assert report.ranks[0].state == buffer_bytes(maps) > 0
    per_table = {t.fqn: t.state for t in report.tables}
    buckets = maps.buckets_by_table()
    assert per_table == {f"mc.{t}": sum(buffer_bytes(b) for b in bs) for t, bs in buckets.items()}
    # t1's sketch is counted: 2 rows of 1024 int32 counters at least.
    assert per_table["mc.t1"] >= 2 * 1024 * 4 + 499 * 8 * 4


def test_the_state_is_counted_in_rank_memory_and_nothing_else_changes() -> None:
    rows = {"t0": 1000, "t1": 500}
    model = Model(managed(rows, buckets=BUCKETS))
    # Row-wise puts the same shards on the same ranks either way: the memory differs by the maps.
    rw = {t: ParameterConstraints(sharding_types=["row_wise"]) for t in rows}
    index = SharderIndex(sharders())
    counted = EmbeddingShardingPlanner(cpu(2), constraints=rw)
    plan = counted.plan(model, index)
    uncounted = EmbeddingShardingPlanner(cpu(2), constraints=rw)
    assert uncounted.plan_tables(tables_of(model, index.module_types()), index) == plan
    with_maps, without = report_of(counted), report_of(uncounted)
    maps = model.mc.managed_collision_collection.buckets_by_table()
    # Bucket g of t0, t1 (in that order) on rank g % 2.
    owned = [buffer_bytes(maps["t0"][0]) + buffer_bytes(maps["t0"][2])]
    owned.append(buffer_bytes(maps["t0"][1]) + buffer_bytes(maps["t1"][0]))
    for r in range(2):
        assert with_maps.ranks[r].state == owned[r]
        assert with_maps.ranks[r].ddr - without.ranks[r].ddr == owned[r]
        assert without.ranks[r].state == 0
        assert with_maps.ranks[r].perf == without.ranks[r].perf
    text = str(with_maps)
    assert "of which state (GiB)" in text
    assert "sharder state beside the shards (id map) of 2 table(s)" in text
    assert "state" not in str(without)


def test_a_model_without_managed_tables_plans_and_prints_as_before() -> None:
    configs = [
        EmbeddingBagConfig(name="a", num_embeddings=1000, embedding_dim=8, feature_names=["f"])
    ]
    ebc = EmbeddingBagCollection(configs, device=torch.device("meta"))
    planner = EmbeddingShardingPlanner(cpu(2))
    plan = planner.plan(ebc, sharders())
    again = EmbeddingShardingPlanner(cpu(2))
    index = SharderIndex(sharders())
    assert again.plan_tables(tables_of(ebc, index.module_types()), index) == plan
    assert _timeless(report_of(planner)) == _timeless(report_of(again))
    assert all(r.state == 0 for r in report_of(planner).ranks)
    assert "state" not in str(report_of(planner))


def _timeless(report: PlanReport) -> list[str]:
    return [line for line in str(report).splitlines() if "planned in" not in line]


def case_sharded_state(env: ShardingEnv) -> dict[str, Any]:
    """DistributedModelParallel plans (the planner on this topology) and shards; the bytes of
    the map buffers this rank's sharded module holds, against the plan report's state."""
    torch.manual_seed(0)
    model = DistributedModelParallel(
        Model(managed({"t0": 1000, "t1": 500}, buckets=BUCKETS)), env=env
    )
    assert model.plan_report is not None
    found = [m for m in model.modules() if isinstance(m, ShardedManagedCollisionEmbeddings)]
    assert len(found) == 1
    held = found[0].managed_collision_collection
    return {
        "measured": buffer_bytes(held),
        "held": {t: sorted(b) for t, b in held.held_buckets().items()},
        "reported": [r.state for r in model.plan_report.ranks],
    }


@pytest.mark.multiprocess
def test_the_estimate_equals_the_buffers_each_rank_holds_when_sharded(dist_pool: Any) -> None:
    results = dist_pool.run(2, case_sharded_state)
    unsharded = managed({"t0": 1000, "t1": 500}, buckets=BUCKETS)
    total = buffer_bytes(unsharded.managed_collision_collection)
    assert [res["held"] for res in results] == [{"t0": [0, 2], "t1": []}, {"t0": [1], "t1": [0]}]
    for rank, res in enumerate(results):
        assert res["reported"] == results[0]["reported"]  # one plan, broadcast
        assert res["measured"] == res["reported"][rank] > 0
    assert sum(res["measured"] for res in results) == total
    # The planner here, on the same topology, says the same.
    planner = EmbeddingShardingPlanner(cpu(2))
    planner.plan(Model(managed({"t0": 1000, "t1": 500}, buckets=BUCKETS)), sharders())
    assert [r.state for r in report_of(planner).ranks] == results[0]["reported"]


# ---- plans that change because of it -----------------------------------------------------------


def test_a_map_too_large_for_its_rank_is_refused_naming_rank_and_table() -> None:
    # 4M rows of dim 8: 122 MiB of weights, which fit a 200 MiB rank; the map (2^23 slots of
    # 16 bytes, four int64 per row) takes 250 MiB more on rank 0.
    model = Model(managed({"t0": 4_000_000}, device="meta"))
    index = SharderIndex(sharders())
    topology = cpu(2, ddr=200 * MiB)
    EmbeddingShardingPlanner(topology, reserved_fraction=0.0).plan_tables(
        tables_of(model, index.module_types()), index
    )  # the plan as it was made without counting the map: it "fits"
    with pytest.raises(PlannerError) as caught:
        EmbeddingShardingPlanner(topology, reserved_fraction=0.0).plan(model, index)
    message = str(caught.value)
    assert message.startswith("rank 0 does not fit the state its sharders keep")
    assert "'mc.t0' 0.244 GiB (id map)" in message
    assert "0.195 GiB DDR usable" in message


def test_a_large_map_moves_the_other_tables_shards_off_its_rank() -> None:
    # mc.t0's map (250 MiB) is on rank 0 whatever t0's sharding. ebc.a (1M x 32 fp32, 132 MiB with
    # its optimizer state) is slower than t0 (76 MiB), so without the map it is placed first, on
    # rank 0. With the map, rank 0 (250 MiB of its 360) has no room for a: a goes to rank 1.
    ebc = EmbeddingBagCollection(
        [
            EmbeddingBagConfig(
                name="a", num_embeddings=1 << 20, embedding_dim=32, feature_names=["g"]
            )
        ],
        device=torch.device("meta"),
    )
    model = Model(managed({"t0": 4_000_000}, dim=4, device="meta"), ebc)
    index = SharderIndex(sharders())
    cap = 360 * MiB
    tw = {n: ParameterConstraints(sharding_types=["table_wise"]) for n in ("t0", "a")}

    def planner() -> EmbeddingShardingPlanner:
        return EmbeddingShardingPlanner(cpu(2, ddr=cap), reserved_fraction=0.0, constraints=tw)

    blind = planner()
    before = blind.plan_tables(tables_of(model, index.module_types()), index)
    assert before.plan["ebc"]["a"].ranks == (0,)
    assert before.plan["mc"]["t0"].ranks == (1,)
    counted = planner()
    after = counted.plan(model, index)
    assert after.plan["ebc"]["a"].ranks == (1,)
    assert after.plan["mc"]["t0"].ranks == (0,)
    state = report_of(counted).ranks[0].state
    assert state == (1 << 23) * 16 + 4 * 8 * (4_000_000 - 1) + 7 * 8 + 2 * 8
    # The blind plan would have held a and the map on rank 0: more than the rank has.
    assert report_of(blind).ranks[0].ddr + state > cap
    assert max(r.ddr for r in report_of(counted).ranks) <= cap
    assert report_of(counted).ranks[0].ddr == report_of(blind).ranks[1].ddr + state


def test_shards_that_do_not_fit_beside_the_maps_are_refused_naming_the_maps_rank() -> None:
    # Rank 0 keeps 30 MiB beside mc.t0's map; rank 1 cannot take both ebc.a (264 MiB) and t0.
    ebc = EmbeddingBagCollection(
        [
            EmbeddingBagConfig(
                name="a", num_embeddings=1 << 20, embedding_dim=64, feature_names=["g"]
            )
        ],
        device=torch.device("meta"),
    )
    model = Model(managed({"t0": 4_000_000}, dim=4, device="meta"), ebc)
    index = SharderIndex(sharders())
    tw = {n: ParameterConstraints(sharding_types=["table_wise"]) for n in ("t0", "a")}
    planner = EmbeddingShardingPlanner(cpu(2, ddr=280 * MiB), reserved_fraction=0.0, constraints=tw)
    planner.plan_tables(tables_of(model, index.module_types()), index)  # blind: it "fits"
    with pytest.raises(PlannerError) as caught:
        planner.plan(model, index)
    message = str(caught.value)
    assert message.startswith("the tables do not fit together")
    assert "(sharder state included)" in message
    assert message.endswith(
        "besides the shards, DDR holds sharder state: rank 0: 'mc.t0' 0.244 GiB (id map)"
    )


# ---- a third party's sharder ---------------------------------------------------------------------


class CachingSharder:
    """Plans an EBC table-wise like the built-in sharder and says it keeps ``per_rank`` bytes
    of a cache for table ``table`` on every rank (replicated state); planning only."""

    def __init__(self, inner: ModuleSharder, states: Sequence[RankState]) -> None:
        self._inner = inner
        self._states = list(states)

    @property
    def module_type(self) -> type[nn.Module]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return ["table_wise"]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return list(self._inner.compute_kernels(sharding_type, compute_device_type))

    def storage_usage(
        self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
    ) -> dict[str, int]:
        return dict(self._inner.storage_usage(tensor, compute_device_type, compute_kernel))

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        raise NotImplementedError("planning only")

    def planner_rank_state(self, module: nn.Module, world_size: int) -> Sequence[RankState]:
        return self._states


def _caching(states: Sequence[RankState]) -> CachingSharder:
    builtin = next(
        s
        for s in sharders()
        if s.module_type is EmbeddingBagCollection and "table_wise" in s.sharding_types("cpu")
    )
    return CachingSharder(builtin, states)


def _ebc() -> EmbeddingBagCollection:
    configs = [
        EmbeddingBagConfig(name=n, num_embeddings=1000, embedding_dim=8, feature_names=[n])
        for n in ("a", "b")
    ]
    return EmbeddingBagCollection(configs, device=torch.device("meta"))


def test_a_third_party_sharder_declares_replicated_state() -> None:
    cache = [RankState(table="a", rank=r, nbytes=3 * MiB, what="row cache") for r in range(3)]
    sharder = _caching(cache)
    assert isinstance(sharder, HasRankState)
    planner = EmbeddingShardingPlanner(cpu(3))
    planner.plan(_ebc(), [sharder])
    report = report_of(planner)
    assert [r.state for r in report.ranks] == [3 * MiB] * 3
    assert {t.fqn: t.state for t in report.tables} == {"a": 9 * MiB, "b": 0}
    assert "sharder state beside the shards (row cache) of 1 table(s)" in str(report)


@pytest.mark.parametrize(
    ("states", "error", "match"),
    [
        (
            [RankState(table="z", rank=0, nbytes=1)],
            PlannerError,
            r"CachingSharder.planner_rank_state names table 'z', which module '<root>' does "
            r"not have \(its tables: \['a', 'b'\]\)",
        ),
        (
            [RankState(table="b", rank=3, nbytes=1, what="row cache")],
            PlannerError,
            r"table 'b': its row cache is declared on rank 3, but the topology has 3 ranks",
        ),
        ([("a", 0, 1)], TypeError, r"returned tuple, not a RankState"),
    ],
)
def test_a_bad_declaration_is_named(
    states: Sequence[Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        EmbeddingShardingPlanner(cpu(3)).plan(_ebc(), [_caching(states)])


def test_a_rank_state_needs_a_rank_and_bytes_of_zero_or_more() -> None:
    with pytest.raises(ValueError, match="RankState of table 'a': rank must be an int >= 0"):
        RankState(table="a", rank=-1, nbytes=0)
    with pytest.raises(ValueError, match="RankState of table 'a': nbytes must be an int >= 0"):
        RankState(table="a", rank=0, nbytes=-5)


def test_plan_tables_refuses_state_of_an_unknown_table() -> None:
    index = SharderIndex(sharders())
    tables = tables_of(_ebc(), index.module_types())
    with pytest.raises(PlannerError, match=r"rank state is declared for tables the plan does"):
        EmbeddingShardingPlanner(cpu(2)).plan_tables(
            tables, index, rank_state=[RankState(table="mc.t0", rank=0, nbytes=1)]
        )
    assert isinstance(EmbeddingShardingPlanner(cpu(2)).plan_tables(tables, index), ShardingPlan)


# ---- dlrm plan -----------------------------------------------------------------------------------


def _dlrm_ranks(managed_ids: str) -> list[list[str]]:
    from click.testing import CliRunner

    from shardrec_dlrm.cli import main

    args = ["plan", "--world-size", "2", "--compute-device", "cpu", "--sharding", "row_wise"]
    args += ["--num-embeddings", "100000", "--managed-ids", managed_ids]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("rank "))
    return [lines[at].split("  "), *(line.split() for line in lines[at + 2 : at + 4])]


def test_dlrm_plan_prints_each_ranks_maps_within_its_memory() -> None:
    header, *managed = _dlrm_ranks("lru")
    assert [h.strip() for h in header if h.strip()][:4] == [
        "rank",
        "HBM (GiB)",
        "DDR (GiB)",
        "of which state (GiB)",
    ]
    _, *plain = _dlrm_ranks("off")
    for with_maps, without in zip(managed, plain, strict=True):
        state = float(with_maps[3])
        assert state > 0.08  # 13 of the 26 maps of 100,000 rows, ~7 MB each
        # Row-wise either way: the same shards, the maps on top (figures rounded to 0.001).
        assert abs(float(with_maps[2]) - float(without[2]) - state) <= 0.002
