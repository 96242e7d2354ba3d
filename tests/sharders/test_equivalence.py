"""Every built-in sharding against the unsharded module, through ``shardrec.testing``.

Each case trains on a gloo group of 2, 3 or 4 processes (the shared pool of tests/conftest.py)
and unsharded on the same global batches; ``check_sharding`` compares every rank's outputs, the
dense and per-id weights' gradients, and every shard of every table and optimizer state after the
steps. Some cases also save, load into the unsharded module and load at another world size
(tests/core/distributed/test_checkpoint_dmp.py reshards every sharding type more thoroughly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from shardrec import (
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
)
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise
from shardrec.testing import EmbeddingModel, GlobalBatch, WorkerPool, check_sharding

from ._tables import SEQUENCE_DIM, table_model

pytestmark = pytest.mark.multiprocess

# rows do not divide by 2, 3 or 4; t1 is read by two features, f2 is read by two tables.
TABLES = [
    ("t0", 7, 4, ["f0"]),
    ("t1", 10, 8, ["f1", "f2"]),
    ("t2", 13, 4, ["f2", "f3"]),
    ("t3", 5, 6, ["f4"]),
]
EC_DIM = SEQUENCE_DIM
LR = 0.05

Plan = Callable[[int], Mapping[str, ParameterSharding]]


def model(
    kind: str, optimizer: str = "sgd", pooling: str = "SUM", weighted: bool = False
) -> EmbeddingModel:
    fused = {"optimizer": optimizer, "learning_rate": LR}
    return table_model(TABLES, kind, fused, pooling=pooling, weighted=weighted)


def plan_of(how: Callable[[int, int], str | tuple[str, list[int]]], kind: str) -> Plan:
    """``how(table index, world)``: ``"rw"``/``"dp"``, or ``("tw"|"cw", ranks)``."""

    def plan(world: int) -> dict[str, ParameterSharding]:
        out = {}
        for i, (name, rows, dim, _) in enumerate(TABLES):
            d = dim if kind == "ebc" else EC_DIM
            choice = how(i, world)
            if choice == "rw":
                out[name] = row_wise(rows, d, world)
            elif choice == "dp":
                out[name] = data_parallel(rows, d, world)
            elif choice[0] == "tw":
                out[name] = table_wise(choice[1][0], rows, d)
            else:
                out[name] = column_wise(rows, d, choice[1])
        return out

    return plan


EVERY_TABLE: dict[str, Callable[[int, int], Any]] = {
    "tw": lambda i, w: ("tw", [i % w]),
    "rw": lambda i, w: "rw",
    "cw": lambda i, w: ("cw", [(i + j) % w for j in range(2)]),
    "dp": lambda i, w: "dp",
}


def mixed(i: int, world: int) -> Any:
    return [("tw", [world - 1]), "rw", ("cw", [1, 0]), "dp"][i]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("sharding", ["tw", "rw", "cw"])
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_sharding_matches_unsharded(
    dist_pool: WorkerPool, world: int, sharding: str, kind: str
) -> None:
    check_sharding(
        model(kind),
        plan=plan_of(EVERY_TABLE[sharding], kind),
        world_size=world,
        reload_world_size=3 if world == 2 else None,
        pool=dist_pool,
    )


@pytest.mark.parametrize("sharding", ["tw", "rw"])
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_rowwise_adagrad(dist_pool: WorkerPool, sharding: str, kind: str) -> None:
    check_sharding(
        model(kind, optimizer="rowwise_adagrad"),
        plan=plan_of(EVERY_TABLE[sharding], kind),
        world_size=3,
        reload_world_size=2 if kind == "ebc" else None,
        pool=dist_pool,
    )


@pytest.mark.parametrize(
    "variant",
    [{"pooling": "MEAN"}, {"weighted": True}, {"empty_rank": 1}],
    ids=["mean", "weighted", "empty-rank"],
)
@pytest.mark.parametrize("sharding", ["tw", "rw", "cw"])
def test_variants(dist_pool: WorkerPool, sharding: str, variant: dict[str, Any]) -> None:
    empty_rank = variant.pop("empty_rank", None)
    check_sharding(
        model("ebc", **variant),
        plan=plan_of(EVERY_TABLE[sharding], "ebc"),
        world_size=3,
        empty_rank=empty_rank,
        pool=dist_pool,
    )


@pytest.mark.parametrize("sharding", ["tw", "rw", "cw"])
def test_mean_pooling_weighted_and_an_empty_rank(dist_pool: WorkerPool, sharding: str) -> None:
    check_sharding(
        model("ebc", pooling="MEAN", weighted=True),
        plan=plan_of(EVERY_TABLE[sharding], "ebc"),
        world_size=3,
        empty_rank=1,
        pool=dist_pool,
    )


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_data_parallel(dist_pool: WorkerPool, kind: str) -> None:
    check_sharding(
        model(kind),
        plan=plan_of(EVERY_TABLE["dp"], kind),
        world_size=2,
        pool=dist_pool,
    )


@pytest.mark.parametrize(("kind", "world"), [("ebc", 2), ("ebc", 3), ("ebc", 4), ("ec", 3)])
def test_mixed_plan(dist_pool: WorkerPool, kind: str, world: int) -> None:
    check_sharding(
        model(kind),
        plan=plan_of(mixed, kind),
        world_size=world,
        empty_rank=world - 1,
        pool=dist_pool,
    )


def _ec_with_indices() -> EmbeddingCollection:
    torch.manual_seed(5)
    configs = [
        EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=EC_DIM, feature_names=f)
        for n, r, _, f in TABLES
    ]
    return EmbeddingCollection(tables=configs, need_indices=True)


def _batch(world: int) -> GlobalBatch:
    rows = {f: min(r for _, r, _, fs in TABLES if f in fs) for f in ["f4", "f0", "f1", "f2", "f3"]}
    return GlobalBatch.random(rows, [2 + r for r in range(world)], seed=7)


def case_need_indices(env: ShardingEnv) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    plan = plan_of(mixed, "ec")(env.world_size)
    dmp = DistributedModelParallel(_ec_with_indices(), env=env, plan=ShardingPlan({"": plan}))
    out = dmp(_batch(env.world_size).kjt(env.rank))
    return {k: (jt.values().detach(), jt.weights()) for k, jt in out.items()}


def test_sharded_embedding_collection_keeps_indices(dist_pool: WorkerPool) -> None:
    results = dist_pool.run(2, case_need_indices)
    reference = _ec_with_indices()
    for rank, got in enumerate(results):
        kjt: KeyedJaggedTensor = _batch(2).kjt(rank)
        expected = reference(kjt)
        assert list(got) == list(expected)
        for name, jt in expected.items():
            torch.testing.assert_close(got[name][0], jt.values(), atol=1e-6, rtol=1e-6)
            assert torch.equal(got[name][1], jt.weights())
