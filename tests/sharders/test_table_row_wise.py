"""Table-wise-row-wise sharding on 4 gloo processes laid out as 2 nodes of 2, against the unsharded
module: outputs, dense gradients, weights after steps, and a checkpoint round trip.

The case functions set ``LOCAL_WORLD_SIZE=2`` as torchrun would on two machines of two processes,
so the sharders registered through the entry point build their node groups from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
    ShardMetadata,
)
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.node_groups import NodeLayout
from shardrec.distributed.sharding_plan import even_splits, table_wise
from shardrec.modules import EmbeddingBagCollection
from shardrec_sharders.table_row_wise import TableRowWiseSharder

from ._reference import (
    Model,
    assert_dense_grads_match,
    assert_outputs_match,
    assert_tables_match,
    build_model,
    ebc_configs,
    local_shards,
    rank_kjt,
    rows_per_rank,
)

pytestmark = pytest.mark.multiprocess

WORLD, LOCAL = 4, 2
# t3 has one row: its only block is on rank 2, rank 3 looks nothing of it up.
TABLES = [
    ("t0", 7, 4, ["f0"]),
    ("t1", 10, 8, ["f1", "f2"]),
    ("t2", 9, 4, ["f2", "f3"]),
    ("t3", 1, 2, ["f4"]),
]
KEYS = ["f4", "f0", "f1", "f2", "f3"]
STEPS = 3
LR = 0.05


@contextmanager
def ranks_per_node(n: int) -> Iterator[None]:
    """What torchrun tells each process: ``LOCAL_WORLD_SIZE``."""
    old = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOCAL_WORLD_SIZE"]
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old


def twrw(rows: int, cols: int, node: int, local: int = LOCAL) -> ParameterSharding:
    ranks = range(node * local, (node + 1) * local)
    shards = tuple(
        ShardMetadata((at, 0), (n, cols), r)
        for r, (at, n) in zip(ranks, even_splits(rows, local), strict=True)
        if n
    )
    return ParameterSharding(
        sharding_type="table_row_wise",
        compute_kernel="fused",
        ranks=tuple(s.rank for s in shards),
        shards=shards,
    )


def make_plan(spec: dict[str, str]) -> ShardingPlan:
    """``spec[table]``: ``"node0"``/``"node1"`` (table-row-wise there) or ``"tw3"``."""
    plan = {}
    for name, rows, dim, _ in TABLES:
        how = spec[name]
        if how.startswith("node"):
            plan[name] = twrw(rows, dim, int(how[4:]))
        else:
            plan[name] = table_wise(int(how[2:]), rows, dim)
    return ShardingPlan({"emb": plan})


SPEC = {"t0": "node0", "t1": "node1", "t2": "node0", "t3": "node1"}
SPEC_MIXED = {"t0": "node1", "t1": "tw3", "t2": "node1", "t3": "tw0"}


def batch_sizes(empty_rank: int | None) -> list[int]:
    return [0 if r == empty_rank else 2 + r for r in range(WORLD)]


def make_batch(step: int, sizes: list[int], rank: int | None, weighted: bool) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(2000 + step)
    rows = {f: min(r for _, r, _, fs in TABLES if f in fs) for f in KEYS}
    lengths = torch.randint(0, 4, (len(KEYS), sum(sizes)), generator=g)
    ids = [
        torch.cat([torch.randint(0, rows[f], (int(n),), generator=g) for n in lengths[k]])
        for k, f in enumerate(KEYS)
    ]
    wts = [torch.rand(int(lengths[k].sum()), generator=g) + 0.5 for k in range(len(KEYS))]
    return rank_kjt(KEYS, lengths, ids, wts if weighted else None, sizes, rank)


def build(kw: dict[str, Any]) -> Model:
    fused = {"optimizer": kw["optimizer"], "learning_rate": LR}
    return build_model(
        "ebc", TABLES, seed=7, fused=fused, pooling=kw["pooling"], weighted=kw["weighted"]
    )


def case_train(env: ShardingEnv, **kw: Any) -> dict[str, Any]:
    with ranks_per_node(LOCAL):
        model = build(kw)
        dmp = DistributedModelParallel(model, env=env, plan=make_plan(kw["spec"]))
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR * WORLD)
    sizes = batch_sizes(kw["empty_rank"])
    outputs, dense_grads = [], []
    for step in range(STEPS):
        rows, loss = dmp(make_batch(step, sizes, env.rank, kw["weighted"]))
        loss.backward()
        outputs.append(rows.detach().clone())
        dense_grads.append(model.dense.weight.grad.clone() * WORLD)
        opt.step()
        opt.zero_grad()
    return {"outputs": outputs, "dense_grads": dense_grads, "shards": local_shards(dmp)}


def reference(kw: dict[str, Any]) -> dict[str, Any]:
    model = build(kw)
    sizes = batch_sizes(kw["empty_rank"])
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


def check(dist_pool: Any, **kw: Any) -> None:
    kw.setdefault("spec", SPEC)
    kw.setdefault("pooling", "SUM")
    kw.setdefault("weighted", False)
    kw.setdefault("empty_rank", None)
    kw.setdefault("optimizer", "sgd")
    results = dist_pool.run(WORLD, case_train, **kw)
    ref = reference(kw)
    sizes = batch_sizes(kw["empty_rank"])
    expected = [
        rows_per_rank("ebc", rows, make_batch(step, sizes, None, False), sizes, TABLES)
        for step, rows in enumerate(ref["outputs"])
    ]
    assert_outputs_match(results, expected)
    assert_dense_grads_match(results, ref["dense_grads"])
    assert_tables_match(results, ref["weights"])


def test_table_row_wise_matches_unsharded_on_two_nodes_of_two(dist_pool: Any) -> None:
    check(dist_pool)


def test_table_row_wise_mean_weighted_empty_rank_rowwise_adagrad(dist_pool: Any) -> None:
    check(
        dist_pool,
        pooling="MEAN",
        weighted=True,
        empty_rank=1,
        optimizer="rowwise_adagrad",
    )


def test_table_row_wise_beside_table_wise_in_one_module(dist_pool: Any) -> None:
    check(dist_pool, spec=SPEC_MIXED, empty_rank=3)


# -- checkpoints -------------------------------------------------------------------------------


def case_train_save(env: ShardingEnv, root: str) -> torch.Tensor:
    kw = {"optimizer": "rowwise_adagrad", "pooling": "SUM", "weighted": False}
    with ranks_per_node(LOCAL):
        model = build(kw)
        dmp = DistributedModelParallel(model, env=env, plan=make_plan(SPEC))
    opt = torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    for step in range(2):
        _, loss = dmp(make_batch(step, batch_sizes(None), env.rank, False))
        loss.backward()
        opt.step()
        opt.zero_grad()
    save(root, dmp, step=2, optimizer=opt, pg=env.pg)
    with torch.no_grad():
        rows, _ = dmp(make_batch(99, batch_sizes(None), env.rank, False))
    return rows


def case_load(env: ShardingEnv, root: str, spec: dict[str, str]) -> torch.Tensor:
    with ranks_per_node(LOCAL):
        model = build({"optimizer": "rowwise_adagrad", "pooling": "SUM", "weighted": False})
        dmp = DistributedModelParallel(model, env=env, plan=make_plan(spec))
    opt = torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    assert load(root, dmp, optimizer=opt, pg=env.pg) == 2
    with torch.no_grad():
        rows, _ = dmp(make_batch(99, batch_sizes(None), env.rank, False))
    return rows


def test_checkpoint_round_trip_and_reshard(dist_pool: Any, tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    saved = dist_pool.run(WORLD, case_train_save, root=root)
    # Same plan, tables moved to the other node, and table-wise: the same outputs.
    swapped = {"t0": "node1", "t1": "node0", "t2": "node1", "t3": "node0"}
    for spec in (SPEC, swapped, SPEC_MIXED):
        loaded = dist_pool.run(WORLD, case_load, root=root, spec=spec)
        for rank, (a, b) in enumerate(zip(saved, loaded, strict=True)):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=f"rank {rank}, {spec}")
    # The unsharded module reads the same weights and fused state back.
    unsharded = build({"optimizer": "rowwise_adagrad", "pooling": "SUM", "weighted": False})
    load(root, unsharded)
    full = make_batch(99, batch_sizes(None), None, False)
    rows, _ = unsharded(full)
    expected = rows_per_rank("ebc", rows.detach(), full, batch_sizes(None), TABLES)
    for rank, got in enumerate(saved):
        torch.testing.assert_close(got, expected[rank], atol=1e-6, rtol=1e-6)


# -- plans the sharder refuses -----------------------------------------------------------------


def _shard(params: dict[str, ParameterSharding]) -> None:
    ebc = EmbeddingBagCollection(ebc_configs(TABLES[:1]))
    TableRowWiseSharder(local_world_size=LOCAL).shard(
        ebc, params, ShardingEnv.from_local(WORLD, 0), torch.device("cpu")
    )


def test_row_blocks_across_nodes_are_refused() -> None:
    shards = (ShardMetadata((0, 0), (4, 4), 1), ShardMetadata((4, 0), (3, 4), 2))
    ps = ParameterSharding(
        sharding_type="table_row_wise", compute_kernel="fused", ranks=(1, 2), shards=shards
    )
    with pytest.raises(ValueError, match=r"'t0'.*ranks \[1, 2\] span nodes \[0, 1\]"):
        _shard({"t0": ps})


def test_row_blocks_that_do_not_tile_are_refused() -> None:
    shards = (ShardMetadata((0, 0), (4, 4), 0), ShardMetadata((5, 0), (2, 4), 1))
    ps = ParameterSharding(
        sharding_type="table_row_wise", compute_kernel="fused", ranks=(0, 1), shards=shards
    )
    with pytest.raises(ValueError, match=r"'t0'.*do not tile"):
        _shard({"t0": ps})


def test_local_world_size_must_divide_the_world() -> None:
    with ranks_per_node(3), pytest.raises(ValueError, match="3 ranks per node"):
        NodeLayout.from_env(4)
    with ranks_per_node(2):
        layout = NodeLayout.from_env(4)
    assert (layout.nodes, layout.node_of(3), layout.local_rank_of(3)) == (2, 1, 1)
    assert list(layout.ranks_of_node(1)) == [2, 3]


def test_embedding_collections_are_not_offered() -> None:
    from shardrec.modules import EmbeddingCollection

    with pytest.raises(TypeError, match="EmbeddingBagCollection only"):
        TableRowWiseSharder(EmbeddingCollection)
