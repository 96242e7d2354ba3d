"""What the two-level sharding tests share: 4 gloo processes laid out as 2 nodes of 2, a small
model, and the checks against the unsharded module (outputs, dense gradients, weights after steps,
checkpoint round trips).

Case functions set ``LOCAL_WORLD_SIZE=2`` as torchrun would on two machines of two processes, so
the sharders registered through the entry point build their node groups from it. Plans travel to
the workers as ``ShardingPlan`` objects over module ``emb``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

from ._reference import (
    TOL,
    Model,
    assert_dense_grads_match,
    assert_outputs_match,
    assert_tables_match,
    build_model,
    local_shards,
    rank_entries,
    rank_kjt,
    rows_per_rank,
)

WORLD, LOCAL = 4, 2
# t3 has one row: under row splits its only block is on one rank of its node.
TABLES = [
    ("t0", 7, 4, ["f0"]),
    ("t1", 10, 8, ["f1", "f2"]),
    ("t2", 9, 4, ["f2", "f3"]),
    ("t3", 1, 2, ["f4"]),
]
KEYS = ["f4", "f0", "f1", "f2", "f3"]  # not the module's order: the router must permute
STEPS = 3
LR = 0.05
EC_DIM = 4


@contextmanager
def ranks_per_node(n: int | None) -> Iterator[None]:
    """What torchrun tells each process: ``LOCAL_WORLD_SIZE`` (None: not set, one node)."""
    old = os.environ.get("LOCAL_WORLD_SIZE")
    if n is None:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
    else:
        os.environ["LOCAL_WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old


def sharding(kind: str, boxes: list[tuple[int, int, int, int, int]]) -> ParameterSharding:
    """``boxes``: (row offset, col offset, rows, cols, rank) of each shard."""
    shards = tuple(ShardMetadata((r0, c0), (nr, nc), rank) for r0, c0, nr, nc, rank in boxes)
    return ParameterSharding(
        sharding_type=kind,
        compute_kernel="fused",
        ranks=tuple(s.rank for s in shards),
        shards=shards,
    )


def dims(kind: str) -> dict[str, tuple[int, int]]:
    """Table -> (rows, dim) as the model of ``kind`` ("ebc" or "ec") has it."""
    return {n: (r, d if kind == "ebc" else EC_DIM) for n, r, d, _ in TABLES}


def batch_sizes(empty_rank: int | None, world: int = WORLD) -> list[int]:
    return [0 if r == empty_rank else 2 + r for r in range(world)]


def make_batch(
    step: int, sizes: list[int], rank: int | None, weighted: bool, weights_grad: bool = False
) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(2000 + step)
    rows = {f: min(r for _, r, _, fs in TABLES if f in fs) for f in KEYS}
    lengths = torch.randint(0, 4, (len(KEYS), sum(sizes)), generator=g)
    ids = [
        torch.cat([torch.randint(0, rows[f], (int(n),), generator=g) for n in lengths[k]])
        for k, f in enumerate(KEYS)
    ]
    wts = [torch.rand(int(lengths[k].sum()), generator=g) + 0.5 for k in range(len(KEYS))]
    return rank_kjt(
        KEYS, lengths, ids, wts if weighted else None, sizes, rank, weights_need_grad=weights_grad
    )


def build(kw: dict[str, Any]) -> Model:
    fused = {"optimizer": kw["optimizer"], "learning_rate": LR}
    return build_model(
        kw["kind"],
        TABLES,
        seed=7,
        fused=fused,
        pooling=kw["pooling"],
        weighted=kw["weighted"],
        ec_dim=EC_DIM,
    )


def case_train(env: ShardingEnv, plan: ShardingPlan, **kw: Any) -> dict[str, Any]:
    world = env.world_size
    with ranks_per_node(kw["local"]):
        model = build(kw)
        dmp = DistributedModelParallel(model, env=env, plan=plan)
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR * world)
    sizes = batch_sizes(kw["empty_rank"], world)
    outputs, dense_grads, weight_grads = [], [], []
    for step in range(STEPS):
        kjt = make_batch(step, sizes, env.rank, kw["weighted"], kw["weights_grad"])
        rows, loss = dmp(kjt)
        loss.backward()
        outputs.append(rows.detach().clone())
        dense_grads.append(model.dense.weight.grad.clone() * world)
        if kw["weights_grad"]:
            weight_grads.append(kjt.weights().grad.clone())
        opt.step()
        opt.zero_grad()
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "weight_grads": weight_grads,
        "shards": local_shards(dmp),
    }


def reference(kw: dict[str, Any]) -> dict[str, Any]:
    model = build(kw)
    sizes = batch_sizes(kw["empty_rank"], kw["world"])
    outputs, dense_grads, weight_grads = [], [], []
    for step in range(STEPS):
        kjt = make_batch(step, sizes, None, kw["weighted"], kw["weights_grad"])
        rows, loss = model(kjt)
        loss.backward()
        outputs.append(rows.detach())
        dense_grads.append(model.dense.weight.grad.clone())
        if kw["weights_grad"]:
            # Per rank: its entries of the global batch's weight gradient.
            grads = torch.split(kjt.weights().grad, kjt.length_per_key())
            lengths = kjt.lengths().view(len(KEYS), -1)
            weight_grads.append([rank_entries(lengths, grads, sizes, r) for r in range(len(sizes))])
        with torch.no_grad():
            for p in model.dense.parameters():
                p -= LR * p.grad
                p.grad = None
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "weight_grads": weight_grads,
        "weights": model.emb.lookup.table_weights(),
    }


def defaults(kw: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "ebc",
        "pooling": "SUM",
        "weighted": False,
        "empty_rank": None,
        "optimizer": "sgd",
        "world": WORLD,
        "local": LOCAL,
        "weights_grad": False,
        **kw,
    }


def check(dist_pool: Any, plan: ShardingPlan, **kw: Any) -> None:
    """Trains ``STEPS`` steps sharded by ``plan`` and unsharded; everything must agree. ``world``
    processes (default 4), ``local`` of them per node (default 2; None: ``LOCAL_WORLD_SIZE``
    unset)."""
    kw = defaults(kw)
    results = dist_pool.run(kw["world"], case_train, plan=plan, **kw)
    ref = reference(kw)
    sizes = batch_sizes(kw["empty_rank"], kw["world"])
    expected = [
        rows_per_rank(kw["kind"], rows, make_batch(step, sizes, None, False), sizes, TABLES)
        for step, rows in enumerate(ref["outputs"])
    ]
    assert_outputs_match(results, expected)
    assert_dense_grads_match(results, ref["dense_grads"])
    assert_tables_match(results, ref["weights"])
    for step, per_rank in enumerate(ref["weight_grads"]):
        for r, result in enumerate(results):
            torch.testing.assert_close(
                result["weight_grads"][step], per_rank[r], **TOL, msg=f"weights' grad, rank {r}"
            )


# -- checkpoints -------------------------------------------------------------------------------

CHECKPOINT_MODEL = {"optimizer": "rowwise_adagrad"}


def case_train_save(env: ShardingEnv, root: str, plan: ShardingPlan, kw: dict[str, Any]) -> Any:
    with ranks_per_node(LOCAL):
        model = build(kw)
        dmp = DistributedModelParallel(model, env=env, plan=plan)
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


def case_load(env: ShardingEnv, root: str, plan: ShardingPlan, kw: dict[str, Any]) -> Any:
    with ranks_per_node(LOCAL):
        model = build(kw)
        dmp = DistributedModelParallel(model, env=env, plan=plan)
    opt = torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    assert load(root, dmp, optimizer=opt, pg=env.pg) == 2
    with torch.no_grad():
        rows, _ = dmp(make_batch(99, batch_sizes(None), env.rank, False))
    return rows


def check_checkpoint(
    dist_pool: Any, root: Path, save_plan: ShardingPlan, load_plans: list[ShardingPlan], **kw: Any
) -> None:
    """Train two steps under ``save_plan`` and save; each of ``load_plans`` (a fresh model)
    loads it and gives the saved model's outputs on a new batch, and so does the unsharded
    module."""
    kw = defaults({**CHECKPOINT_MODEL, **kw})
    saved = dist_pool.run(WORLD, case_train_save, root=str(root), plan=save_plan, kw=kw)
    for plan in load_plans:
        loaded = dist_pool.run(WORLD, case_load, root=str(root), plan=plan, kw=kw)
        for rank, (a, b) in enumerate(zip(saved, loaded, strict=True)):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=f"rank {rank}, {plan}")
    unsharded = build(kw)
    load(str(root), unsharded)
    full = make_batch(99, batch_sizes(None), None, False)
    rows, _ = unsharded(full)
    expected = rows_per_rank(kw["kind"], rows.detach(), full, batch_sizes(None), TABLES)
    for rank, got in enumerate(saved):
        torch.testing.assert_close(got, expected[rank], atol=1e-6, rtol=1e-6)
