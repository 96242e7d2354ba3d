"""Every sharding against the unsharded module: outputs, dense gradients, and weights after steps.

Each case runs on a gloo group of 2, 3 or 4 processes (the pooled workers of conftest.py). The
reference runs here, unsharded, on the concatenation of every rank's batch; rank ``r`` must see
the reference's rows for its own samples. Losses are sums over samples, so the embedding
gradients add up across ranks exactly as in the reference; DDP averages dense gradients, so the
sharded run's dense optimizer uses ``lr * world_size``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec import EmbeddingCollection, KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise

from ._reference import (
    Model,
    assert_dense_grads_match,
    assert_outputs_match,
    assert_tables_match,
    build_model,
    ec_configs,
    local_shards,
    rank_kjt,
    rows_per_rank,
)

pytestmark = pytest.mark.multiprocess

# rows do not divide by 2, 3 or 4; t1 is read by two features, f2 is read by two tables.
TABLES = [
    ("t0", 7, 4, ["f0"]),
    ("t1", 10, 8, ["f1", "f2"]),
    ("t2", 13, 4, ["f2", "f3"]),
    ("t3", 5, 6, ["f4"]),
]
KEYS = ["f4", "f0", "f1", "f2", "f3"]  # not the module's order: the router must permute
STEPS = 3
LR = 0.05


def build(kw: dict[str, Any]) -> Model:
    optimizer = kw["optimizer"]
    fused = None if optimizer is None else {"optimizer": optimizer, "learning_rate": LR}
    return build_model(
        kw["kind"], TABLES, seed=123, fused=fused, pooling=kw["pooling"], weighted=kw["weighted"]
    )


def batch_sizes(world: int, empty_rank: int | None) -> list[int]:
    return [0 if r == empty_rank else 2 + r for r in range(world)]


def make_batch(step: int, sizes: list[int], rank: int | None, weighted: bool) -> KeyedJaggedTensor:
    """The global batch (rank None) or rank ``rank``'s slice of it; same numbers everywhere."""
    g = torch.Generator().manual_seed(1000 + step)
    total = sum(sizes)
    rows = {f: min(r for _, r, _, fs in TABLES if f in fs) for f in KEYS}
    lengths = torch.randint(0, 4, (len(KEYS), total), generator=g)
    ids = [
        torch.cat([torch.randint(0, rows[f], (int(n),), generator=g) for n in lengths[k]])
        for k, f in enumerate(KEYS)
    ]
    wts = [
        torch.cat([torch.rand(int(n), generator=g) + 0.5 for n in lengths[k]])
        for k in range(len(KEYS))
    ]
    return rank_kjt(KEYS, lengths, ids, wts if weighted else None, sizes, rank)


def make_plan(spec: dict[str, tuple[str, list[int]]], world: int, kind: str) -> ShardingPlan:
    plan = {}
    for name, r, dim, _ in TABLES:
        d = dim if kind == "ebc" else 4
        how, ranks = spec[name]
        if how == "tw":
            plan[name] = table_wise(ranks[0], r, d)
        elif how == "rw":
            plan[name] = row_wise(r, d, world)
        elif how == "cw":
            plan[name] = column_wise(r, d, ranks)
        else:
            plan[name] = data_parallel(r, d, world)
    return ShardingPlan({"emb": plan})


def case_train(env: ShardingEnv, **kw: Any) -> dict[str, Any]:
    world, rank = env.world_size, env.rank
    model = build(kw)
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(kw["spec"], world, kw["kind"]))
    dense = [p for p in dmp.parameters() if p.requires_grad]
    opt = torch.optim.SGD(dense, lr=LR * world)
    sizes = batch_sizes(world, kw["empty_rank"])
    outputs, dense_grads = [], []
    for step in range(STEPS):
        rows, loss = dmp(make_batch(step, sizes, rank, kw["weighted"]))
        loss.backward()
        outputs.append(rows.detach().clone())
        dense_grads.append(model.dense.weight.grad.clone() * world)
        opt.step()
        opt.zero_grad()
    return {"outputs": outputs, "dense_grads": dense_grads, "shards": local_shards(dmp)}


def reference(kw: dict[str, Any], world: int) -> dict[str, Any]:
    model = build(kw)
    sizes = batch_sizes(world, kw["empty_rank"])
    outputs, dense_grads = [], []
    for step in range(STEPS):
        rows, loss = model(make_batch(step, sizes, None, kw["weighted"]))
        loss.backward()
        outputs.append(rows.detach())
        dense_grads.append(model.dense.weight.grad.clone())
        with torch.no_grad():
            for p in model.dense.parameters():
                p -= LR * p.grad
                p.grad = None
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "weights": model.emb.lookup.table_weights(),
    }


def check(dist_pool: Any, world: int, **kw: Any) -> None:
    kw.setdefault("pooling", "SUM")
    kw.setdefault("weighted", False)
    kw.setdefault("empty_rank", None)
    kw.setdefault("optimizer", "sgd")
    results = dist_pool.run(world, case_train, **kw)
    ref = reference(kw, world)
    sizes = batch_sizes(world, kw["empty_rank"])
    expected = [
        rows_per_rank(kw["kind"], rows, make_batch(step, sizes, None, False), sizes, TABLES)
        for step, rows in enumerate(ref["outputs"])
    ]
    assert_outputs_match(results, expected)
    assert_dense_grads_match(results, ref["dense_grads"])
    assert_tables_match(results, ref["weights"])


def spec_all(kind: str, world: int) -> dict[str, tuple[str, list[int]]]:
    if kind == "tw":
        return {n: ("tw", [i % world]) for i, (n, *_) in enumerate(TABLES)}
    if kind == "cw":
        return {n: ("cw", [(i + j) % world for j in range(2)]) for i, (n, *_) in enumerate(TABLES)}
    return {n: (kind, list(range(world))) for n, *_ in TABLES}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("sharding", ["tw", "rw", "cw"])
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_sharding_matches_unsharded(dist_pool: Any, world: int, sharding: str, kind: str) -> None:
    check(dist_pool, world, kind=kind, spec=spec_all(sharding, world))


@pytest.mark.parametrize("sharding", ["tw", "rw"])
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_rowwise_adagrad(dist_pool: Any, sharding: str, kind: str) -> None:
    check(dist_pool, 3, kind=kind, spec=spec_all(sharding, 3), optimizer="rowwise_adagrad")


@pytest.mark.parametrize(
    "variant",
    [{"pooling": "MEAN"}, {"weighted": True}, {"empty_rank": 1}],
    ids=["mean", "weighted", "empty-rank"],
)
@pytest.mark.parametrize("sharding", ["tw", "rw", "cw"])
def test_variants(dist_pool: Any, sharding: str, variant: dict[str, Any]) -> None:
    check(dist_pool, 3, kind="ebc", spec=spec_all(sharding, 3), **variant)


@pytest.mark.parametrize("sharding", ["tw", "rw", "cw"])
def test_mean_pooling_weighted_and_an_empty_rank(dist_pool: Any, sharding: str) -> None:
    check(
        dist_pool,
        3,
        kind="ebc",
        spec=spec_all(sharding, 3),
        pooling="MEAN",
        weighted=True,
        empty_rank=1,
    )


def spec_mixed(world: int) -> dict[str, tuple[str, list[int]]]:
    return {
        "t0": ("tw", [world - 1]),
        "t1": ("rw", list(range(world))),
        "t2": ("cw", [1, 0]),
        "t3": ("dp", list(range(world))),
    }


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_data_parallel(dist_pool: Any, kind: str) -> None:
    # Data-parallel tables train through DDP and the dense optimizer (plain SGD here), which
    # matches the reference's fused SGD.
    check(dist_pool, 2, kind=kind, spec=spec_all("dp", 2))


@pytest.mark.parametrize(("kind", "world"), [("ebc", 2), ("ebc", 3), ("ebc", 4), ("ec", 3)])
def test_mixed_plan(dist_pool: Any, kind: str, world: int) -> None:
    check(dist_pool, world, kind=kind, spec=spec_mixed(world), empty_rank=world - 1)


def _ec_with_indices() -> EmbeddingCollection:
    torch.manual_seed(5)
    return EmbeddingCollection(tables=ec_configs(TABLES, 4), need_indices=True)


def case_need_indices(env: ShardingEnv) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    plan = make_plan(spec_mixed(env.world_size), env.world_size, "ec")
    model = DistributedModelParallel(
        _ec_with_indices(), env=env, plan=ShardingPlan({"": plan.plan["emb"]})
    )
    out = model(make_batch(0, batch_sizes(env.world_size, None), env.rank, False))
    return {k: (jt.values().detach(), jt.weights()) for k, jt in out.items()}


def test_sharded_embedding_collection_keeps_indices(dist_pool: Any) -> None:
    results = dist_pool.run(2, case_need_indices)
    reference = _ec_with_indices()
    for rank, got in enumerate(results):
        expected = reference(make_batch(0, batch_sizes(2, None), rank, False))
        assert list(got) == list(expected)
        for name, jt in expected.items():
            torch.testing.assert_close(got[name][0], jt.values(), atol=1e-6, rtol=1e-6)
            assert torch.equal(got[name][1], jt.weights())
