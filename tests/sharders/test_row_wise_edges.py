"""Row-wise edge cases against the unsharded module: ranks that hold no rows, and ranks with no ids.

A collective is entered by every rank or it hangs, so a rank that holds no block of a row-wise
table (a table with fewer rows than ranks, or an empty block in an explicit plan), a rank whose
block receives no ids in a step, and a rank with an empty batch must all take part in the
forward's and the backward's all-to-alls like their peers. Each case trains 3 steps on a gloo group
of 3 or 4 processes (the pooled workers of conftest.py, which time a hung case out) and compares
outputs, dense gradients, the tables' gradients (plain mode) and the tables after the steps with
the unsharded module on the concatenation of every rank's batch.

Two training modes: ``plain`` (no fused optimizer: the tables are parameters that get ``.grad``
and a torch SGD with momentum and weight decay updates them, so a shard that gets no gradient where
the unsharded table gets a zero one would be decayed differently) and ``sgd`` (fused SGD).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from shardrec import KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import row_wise, table_wise
from shardrec.distributed.types import ParameterSharding, ShardingType, ShardMetadata

from ._reference import (
    TOL,
    Model,
    assemble,
    assert_dense_grads_match,
    assert_outputs_match,
    assert_tables_match,
    build_model,
    local_shards,
    rank_kjt,
    rows_per_rank,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

# (name, rows, EBC dim, features). "tiny" has fewer rows than ranks; "small" leaves rank 3 of 4
# without a block; "big" is read by two features. EBC dims differ (the torch kernel looks each table
# up alone; FBGEMM, which fused SUM SGD uses where installed, all three in one call).
TABLES = [
    ("tiny", 2, 4, ["a"]),
    ("small", 3, 8, ["b"]),
    ("big", 9, 12, ["c", "d"]),
]
KEYS = ["d", "a", "c", "b"]  # not the module's order
ROWS = {f: r for _, r, _, fs in TABLES for f in fs}
EC_DIM = 4
STEPS = 3
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 0.01


def build(kind: str, mode: str, pooling: str = "SUM", weighted: bool = False) -> Model:
    # squash: the tables' gradients depend on the rows looked up, not only on the dense layer.
    fused = None if mode == "plain" else {"optimizer": mode, "learning_rate": LR}
    return build_model(
        kind,
        TABLES,
        seed=321,
        fused=fused,
        pooling=pooling,
        weighted=weighted,
        ec_dim=EC_DIM,
        squash=True,
    )


def make_batch(
    step: int, sizes: list[int], rank: int | None, silent_rank: int | None, weighted: bool = False
) -> KeyedJaggedTensor:
    """The global batch (rank None) or rank ``rank``'s slice of it; same numbers everywhere.

    Feature "a" (table "tiny") reads only row 1 at step 0 and only row 0 at step 1, so the owner
    of the other row receives no ids; ``silent_rank``'s samples have no "a" ids at all.
    """
    g = torch.Generator().manual_seed(2000 + step)
    lengths = torch.randint(0, 4, (len(KEYS), sum(sizes)), generator=g)
    if silent_rank is not None:
        lo = sum(sizes[:silent_rank])
        lengths[KEYS.index("a"), lo : lo + sizes[silent_rank]] = 0
    ids = []
    for k, f in enumerate(KEYS):
        n = int(lengths[k].sum())
        if f == "a" and step < 2:
            ids.append(torch.full((n,), 1 - step, dtype=torch.int64))
        else:
            ids.append(torch.randint(0, ROWS[f], (n,), generator=g))
    wts = [torch.rand(x.numel(), generator=g) + 0.5 for x in ids]
    return rank_kjt(KEYS, lengths, ids, wts if weighted else None, sizes, rank)


def rows_with_empty(name: str, rows: int, cols: int, world: int, empty: int) -> ParameterSharding:
    """Row blocks on every rank but ``empty``, which is planned a zero-row block."""
    holders = [r for r in range(world) if r != empty]
    base, extra = divmod(rows, len(holders))
    shards, at = [], 0
    for r in range(world):
        n = 0 if r == empty else base + (1 if holders.index(r) < extra else 0)
        shards.append(ShardMetadata((at, 0), (n, cols), r))
        at += n
    return ParameterSharding(
        sharding_type=ShardingType.ROW_WISE.value,
        compute_kernel="fused",
        ranks=tuple(range(world)),
        shards=tuple(shards),
    )


def make_plan(layout: str, world: int, kind: str) -> ShardingPlan:
    """``all_rw``: every table row-wise. ``tiny_rw``: only "tiny" is row-wise (so some ranks hold
    nothing at all of the row-wise part), the others table-wise. ``gap``: row-wise with rank 1
    planned an empty block of every table."""
    plan: dict[str, ParameterSharding] = {}
    for i, (name, rows, dim, _) in enumerate(TABLES):
        d = dim if kind == "ebc" else EC_DIM
        if layout == "all_rw" or (layout == "tiny_rw" and name == "tiny"):
            plan[name] = row_wise(rows, d, world)
        elif layout == "tiny_rw":
            plan[name] = table_wise(world - 1 - i, rows, d)
        else:
            plan[name] = rows_with_empty(name, rows, d, world, empty=1)
    return ShardingPlan({"emb": plan})


def sharded_lookups(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "local_tables") and hasattr(m, "lookup")]


def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def case_train(env: ShardingEnv, **kw: Any) -> dict[str, Any]:
    world, rank = env.world_size, env.rank
    model = build(kw["kind"], kw["mode"], kw["pooling"], kw["weighted"])
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(kw["layout"], world, kw["kind"]))
    parts = sharded_lookups(dmp.module.emb)
    tables = [(lt, part.lookup.weights[lt.name]) for part in parts for lt in part.local_tables]
    dense = list(model.dense.parameters())
    opt = make_optimizer([p for p in dmp.parameters() if p.requires_grad])
    outputs, dense_grads, table_grads = [], [], []
    for step in range(STEPS):
        batch = make_batch(step, kw["sizes"], rank, kw["silent_rank"], kw["weighted"])
        rows, loss = dmp(batch)
        loss.backward()
        outputs.append(rows.detach().clone())
        for p in dense:
            assert p.grad is not None
            p.grad *= world  # DDP averages; the reference's loss is the sum over ranks
        dense_grads.append(model.dense.weight.grad.clone())
        table_grads.append(
            [
                (lt.table, *lt.rect.offsets, None if w.grad is None else w.grad.clone())
                for lt, w in tables
                if w.requires_grad
            ]
        )
        opt.step()
        opt.zero_grad()
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "table_grads": table_grads,
        "shards": local_shards(dmp),
    }


def reference(kw: dict[str, Any]) -> dict[str, Any]:
    model = build(kw["kind"], kw["mode"], kw["pooling"], kw["weighted"])
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    weights = model.emb.lookup.weights
    outputs, dense_grads, table_grads = [], [], []
    for step in range(STEPS):
        batch = make_batch(step, kw["sizes"], None, kw["silent_rank"], kw["weighted"])
        rows, loss = model(batch)
        loss.backward()
        outputs.append(rows.detach().clone())
        dense_grads.append(model.dense.weight.grad.clone())
        table_grads.append({n: w.grad.clone() for n, w in weights.items() if w.grad is not None})
        opt.step()
        opt.zero_grad()
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "table_grads": table_grads,
        "weights": {n: w.detach() for n, w in model.emb.lookup.table_weights().items()},
    }


def assert_table_grads_match(
    results: list[dict[str, Any]], expected: list[dict[str, torch.Tensor]]
) -> None:
    """Every shard of a table the reference gives a gradient at a step must get its rows of it (a
    zero block where it received no ids, never None), and all shards together cover the table."""
    for step, grads in enumerate(expected):
        for table, grad in grads.items():
            blocks = []
            for r, result in enumerate(results):
                for name, row, col, g in result["table_grads"][step]:
                    if name != table:
                        continue
                    assert g is not None, f"table {table}: rank {r}'s shard has no grad at {step}"
                    blocks.append((g, (row, col)))
            torch.testing.assert_close(
                assemble(grad, blocks), grad, **TOL, msg=f"grad of table {table} at step {step}"
            )


def check(dist_pool: Any, world: int, **kw: Any) -> None:
    kw.setdefault("sizes", [2 + r % 2 for r in range(world)])
    kw.setdefault("silent_rank", None)
    kw.setdefault("pooling", "SUM")
    kw.setdefault("weighted", False)
    results = dist_pool.run(world, case_train, **kw)
    ref = reference(kw)
    sizes = kw["sizes"]
    expected = [
        rows_per_rank(
            kw["kind"], rows, make_batch(step, sizes, None, kw["silent_rank"]), sizes, TABLES
        )
        for step, rows in enumerate(ref["outputs"])
    ]
    assert_outputs_match(results, expected)
    assert_dense_grads_match(results, ref["dense_grads"])
    if kw["mode"] == "plain":
        assert_table_grads_match(results, ref["table_grads"])
    assert_tables_match(results, ref["weights"])


MODES = ["plain", "sgd"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["all_rw", "tiny_rw", "gap"])
@pytest.mark.parametrize("world", [3, 4])
def test_ranks_without_rows(dist_pool: Any, world: int, layout: str, mode: str) -> None:
    check(dist_pool, world, kind="ebc", mode=mode, layout=layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [3, 4])
def test_rank_with_empty_batch(dist_pool: Any, world: int, mode: str) -> None:
    sizes = [2, 0, 3, 1][:world]
    check(dist_pool, world, kind="ebc", mode=mode, layout="tiny_rw", sizes=sizes)
    check(dist_pool, world, kind="ebc", mode=mode, layout="all_rw", sizes=sizes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [3, 4])
def test_rank_sending_no_ids(dist_pool: Any, world: int, mode: str) -> None:
    check(dist_pool, world, kind="ebc", mode=mode, layout="all_rw", silent_rank=world - 1)
    check(dist_pool, world, kind="ebc", mode=mode, layout="tiny_rw", silent_rank=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [3, 4])
def test_embedding_collection(dist_pool: Any, world: int, mode: str) -> None:
    check(dist_pool, world, kind="ec", mode=mode, layout="tiny_rw")
    check(dist_pool, world, kind="ec", mode=mode, layout="gap", sizes=[2, 0, 3, 1][:world])
    check(dist_pool, world, kind="ec", mode=mode, layout="all_rw", silent_rank=1)


@pytest.mark.parametrize("mode", MODES)
def test_mean_pooling_and_weights(dist_pool: Any, mode: str) -> None:
    # MEAN divides the summed partial bags after the output exchange: an empty bag stays zero.
    for layout in ("all_rw", "tiny_rw"):
        check(
            dist_pool,
            4,
            kind="ebc",
            mode=mode,
            layout=layout,
            pooling="MEAN",
            weighted=True,
            sizes=[3, 0, 2, 1],
            silent_rank=2,
        )
