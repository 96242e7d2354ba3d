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
from torch import nn

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise

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


def build(kind: str, pooling: str, weighted: bool, optimizer: str | None) -> nn.Module:
    torch.manual_seed(123)
    fused = None if optimizer is None else {"optimizer": optimizer, "learning_rate": LR}
    emb: nn.Module
    if kind == "ebc":
        configs = [
            EmbeddingBagConfig(
                name=n,
                num_embeddings=r,
                embedding_dim=d,
                feature_names=f,
                pooling=PoolingType(pooling),
            )
            for n, r, d, f in TABLES
        ]
        emb = EmbeddingBagCollection(tables=configs, is_weighted=weighted, fused_params=fused)
        width = sum(d * len(f) for _, _, d, f in TABLES)
    else:
        configs_ec = [
            EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=4, feature_names=f)
            for n, r, _, f in TABLES
        ]
        emb = EmbeddingCollection(tables=configs_ec, fused_params=fused)
        width = 4
    return Model(emb, nn.Linear(width, 1))


class Model(nn.Module):
    def __init__(self, emb: nn.Module, dense: nn.Linear) -> None:
        super().__init__()
        self.emb = emb
        self.dense = dense

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.emb(kjt)
        if isinstance(out, dict):
            rows = torch.cat([out[k].values() for k in sorted(out)])
        else:
            rows = out.values()
        return rows, self.dense(rows).sum()


def batch_sizes(world: int, empty_rank: int | None) -> list[int]:
    return [0 if r == empty_rank else 2 + r for r in range(world)]


def make_batch(step: int, sizes: list[int], rank: int | None, weighted: bool) -> KeyedJaggedTensor:
    """The global batch (rank None) or rank ``rank``'s slice of it; same numbers everywhere."""
    g = torch.Generator().manual_seed(1000 + step)
    total = sum(sizes)
    rows = {f: min(r for _, r, _, fs in TABLES if f in fs) for f in KEYS}
    lengths = torch.randint(0, 4, (len(KEYS), total), generator=g)
    ids = [
        [torch.randint(0, rows[f], (int(n),), generator=g) for n in lengths[k]]
        for k, f in enumerate(KEYS)
    ]
    wts = [[torch.rand(int(n), generator=g) + 0.5 for n in lengths[k]] for k in range(len(KEYS))]
    lo, hi = (0, total) if rank is None else (sum(sizes[:rank]), sum(sizes[: rank + 1]))
    empty = [torch.zeros(0, dtype=torch.int64)]
    values = torch.cat([torch.cat(ids[k][lo:hi] + empty) for k in range(len(KEYS))])
    w = None
    if weighted:
        w = torch.cat([torch.cat([*wts[k][lo:hi], torch.zeros(0)]) for k in range(len(KEYS))])
    return KeyedJaggedTensor(
        keys=KEYS, values=values, lengths=lengths[:, lo:hi].reshape(-1), weights=w
    )


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
    model = build(kw["kind"], kw["pooling"], kw["weighted"], kw["optimizer"])
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(kw["spec"], world, kw["kind"]))
    dense = [p for p in dmp.parameters() if p.requires_grad]
    opt = torch.optim.SGD(dense, lr=LR * world)
    sizes = batch_sizes(world, kw["empty_rank"])
    outputs, grads = [], []
    for step in range(STEPS):
        rows, loss = dmp(make_batch(step, sizes, rank, kw["weighted"]))
        loss.backward()
        outputs.append(rows.detach().clone())
        grads.append(model.dense.weight.grad.clone() * world)
        opt.step()
        opt.zero_grad()
    shards = {
        table: [(s.tensor.clone(), s.offsets) for s in ts.weight]
        for table, ts in dmp.local_table_shards()["emb"].items()
    }
    return {"outputs": outputs, "grads": grads, "shards": shards}


def reference(kw: dict[str, Any], world: int) -> dict[str, Any]:
    model = build(kw["kind"], kw["pooling"], kw["weighted"], kw["optimizer"])
    sizes = batch_sizes(world, kw["empty_rank"])
    outputs, grads = [], []
    for step in range(STEPS):
        rows, loss = model(make_batch(step, sizes, None, kw["weighted"]))
        loss.backward()
        outputs.append(rows.detach())
        grads.append(model.dense.weight.grad.clone())
        with torch.no_grad():
            for p in model.dense.parameters():
                p -= LR * p.grad
                p.grad = None
    return {"outputs": outputs, "grads": grads, "weights": model.emb.lookup.table_weights()}


def split_rows(
    kw: dict[str, Any], rows: torch.Tensor, sizes: list[int], step: int, world: int
) -> list[torch.Tensor]:
    """The reference output rows that belong to each rank."""
    if kw["kind"] == "ebc":
        return list(torch.split(rows, sizes))
    # EC: rows are per output name (sorted), each name's ids in sample order.
    names = sorted(f"{f}@{t}" if _shared(f) else f for t, _, _, fs in TABLES for f in fs)
    full = make_batch(step, sizes, None, False)
    features = [n.split("@")[0] for n in names]
    lpk = dict(zip(full.keys(), full.length_per_key(), strict=True))
    by_name = torch.split(rows, [lpk[f] for f in features])
    starts = [sum(sizes[:r]) for r in range(world)]
    per_rank = []
    for r in range(world):
        parts = []
        for f, block in zip(features, by_name, strict=True):
            lengths = full[f].lengths()
            lo = int(lengths[: starts[r]].sum())
            hi = lo + int(lengths[starts[r] : starts[r] + sizes[r]].sum())
            parts.append(block[lo:hi])
        per_rank.append(torch.cat(parts))
    return per_rank


def _shared(feature: str) -> bool:
    return sum(feature in fs for *_, fs in TABLES) > 1


def check(dist_pool: Any, world: int, **kw: Any) -> None:
    kw.setdefault("pooling", "SUM")
    kw.setdefault("weighted", False)
    kw.setdefault("empty_rank", None)
    kw.setdefault("optimizer", "sgd")
    results = dist_pool.run(world, case_train, **kw)
    ref = reference(kw, world)
    sizes = batch_sizes(world, kw["empty_rank"])
    for step in range(STEPS):
        expected = split_rows(kw, ref["outputs"][step], sizes, step, world)
        for r in range(world):
            got = results[r]["outputs"][step]
            torch.testing.assert_close(
                got, expected[r], atol=1e-5, rtol=1e-5, msg=f"output of rank {r} at step {step}"
            )
            torch.testing.assert_close(
                results[r]["grads"][step],
                ref["grads"][step],
                atol=1e-5,
                rtol=1e-5,
                msg=f"dense grad, rank {r}",
            )
    for table, weight in ref["weights"].items():
        rebuilt = torch.full_like(weight, float("nan"))
        for r in range(world):
            for tensor, (row, col) in results[r]["shards"][table]:
                rebuilt[row : row + tensor.shape[0], col : col + tensor.shape[1]] = tensor
        torch.testing.assert_close(
            rebuilt, weight, atol=1e-5, rtol=1e-5, msg=f"table {table} after {STEPS} steps"
        )


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
    return EmbeddingCollection(
        tables=[
            EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=4, feature_names=f)
            for n, r, _, f in TABLES
        ],
        need_indices=True,
    )


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
