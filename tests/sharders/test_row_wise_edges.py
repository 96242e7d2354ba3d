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

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import row_wise, table_wise
from shardrec.distributed.types import ParameterSharding, ShardingType, ShardMetadata

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


def build(kind: str, mode: str, pooling: str = "SUM", weighted: bool = False) -> nn.Module:
    torch.manual_seed(321)
    fused = None if mode == "plain" else {"optimizer": mode, "learning_rate": LR}
    emb: nn.Module
    if kind == "ebc":
        emb = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=n,
                    num_embeddings=r,
                    embedding_dim=d,
                    feature_names=f,
                    pooling=PoolingType(pooling),
                )
                for n, r, d, f in TABLES
            ],
            is_weighted=weighted,
            fused_params=fused,
        )
        width = sum(d * len(f) for _, _, d, f in TABLES)
    else:
        emb = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=EC_DIM, feature_names=f)
                for n, r, _, f in TABLES
            ],
            fused_params=fused,
        )
        width = EC_DIM
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
        # tanh: the tables' gradients depend on the rows looked up, not only on the dense layer.
        return rows, self.dense(torch.tanh(rows)).sum()


def make_batch(
    step: int, sizes: list[int], rank: int | None, silent_rank: int | None, weighted: bool = False
) -> KeyedJaggedTensor:
    """The global batch (rank None) or rank ``rank``'s slice of it; same numbers everywhere.

    Feature "a" (table "tiny") reads only row 1 at step 0 and only row 0 at step 1, so the owner
    of the other row receives no ids; ``silent_rank``'s samples have no "a" ids at all.
    """
    g = torch.Generator().manual_seed(2000 + step)
    total = sum(sizes)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    lengths = torch.randint(0, 4, (len(KEYS), total), generator=g)
    if silent_rank is not None:
        lo = starts[silent_rank]
        lengths[KEYS.index("a"), lo : lo + sizes[silent_rank]] = 0
    ids = []
    for k, f in enumerate(KEYS):
        n = int(lengths[k].sum())
        if f == "a" and step < 2:
            ids.append(torch.full((n,), 1 - step, dtype=torch.int64))
        else:
            ids.append(torch.randint(0, ROWS[f], (n,), generator=g))
    wts = [torch.rand(x.numel(), generator=g) + 0.5 for x in ids]
    lo, hi = (0, total) if rank is None else (starts[rank], starts[rank] + sizes[rank])
    values, weights = [], []
    for k in range(len(KEYS)):
        first = int(lengths[k, :lo].sum())
        last = first + int(lengths[k, lo:hi].sum())
        values.append(ids[k][first:last])
        weights.append(wts[k][first:last])
    return KeyedJaggedTensor(
        keys=KEYS,
        values=torch.cat(values),
        lengths=lengths[:, lo:hi].reshape(-1),
        weights=torch.cat(weights) if weighted else None,
    )


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
                (lt.table, lt.row_offset, lt.col_offset, None if w.grad is None else w.grad.clone())
                for lt, w in tables
                if w.requires_grad
            ]
        )
        opt.step()
        opt.zero_grad()
    shards = {
        table: [(s.tensor.clone(), s.offsets) for s in ts.weight]
        for table, ts in dmp.local_table_shards()["emb"].items()
    }
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "table_grads": table_grads,
        "shards": shards,
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


def split_rows(kw: dict[str, Any], rows: torch.Tensor, step: int) -> list[torch.Tensor]:
    """The reference output rows that belong to each rank."""
    sizes = kw["sizes"]
    if kw["kind"] == "ebc":
        return list(torch.split(rows, sizes))
    # EC: one block per output name (sorted), each name's ids in sample order.
    full = make_batch(step, sizes, None, kw["silent_rank"])
    names = sorted(full.keys())
    by_name = torch.split(rows, [full[n].lengths().sum().item() for n in names])
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    per_rank = []
    for r, lo in enumerate(starts):
        parts = []
        for n, block in zip(names, by_name, strict=True):
            lengths = full[n].lengths()
            first = int(lengths[:lo].sum())
            parts.append(block[first : first + int(lengths[lo : lo + sizes[r]].sum())])
        per_rank.append(torch.cat(parts))
    return per_rank


def check(dist_pool: Any, world: int, **kw: Any) -> None:
    kw.setdefault("sizes", [2 + r % 2 for r in range(world)])
    kw.setdefault("silent_rank", None)
    kw.setdefault("pooling", "SUM")
    kw.setdefault("weighted", False)
    results = dist_pool.run(world, case_train, **kw)
    ref = reference(kw)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    for step in range(STEPS):
        expected = split_rows(kw, ref["outputs"][step], step)
        for r in range(world):
            got = results[r]
            torch.testing.assert_close(
                got["outputs"][step], expected[r], **tol, msg=f"output, rank {r}, step {step}"
            )
            torch.testing.assert_close(
                got["dense_grads"][step],
                ref["dense_grads"][step],
                **tol,
                msg=f"dense grad, rank {r}, step {step}",
            )
        if kw["mode"] != "plain":
            continue
        # Every shard of a table the reference gives a gradient must get its rows of it (a zero
        # block where it received no ids, never None), and all shards together cover the table.
        for table, grad in ref["table_grads"][step].items():
            rebuilt = torch.full_like(grad, float("nan"))
            for r in range(world):
                for name, row, col, g in results[r]["table_grads"][step]:
                    if name != table:
                        continue
                    assert g is not None, f"table {table}: rank {r}'s shard has no grad at {step}"
                    rebuilt[row : row + g.shape[0], col : col + g.shape[1]] = g
            torch.testing.assert_close(
                rebuilt, grad, **tol, msg=f"grad of table {table} at step {step}"
            )
    for table, weight in ref["weights"].items():
        rebuilt = torch.full_like(weight, float("nan"))
        for r in range(world):
            for tensor, (row, col) in results[r]["shards"][table]:
                rebuilt[row : row + tensor.shape[0], col : col + tensor.shape[1]] = tensor
        torch.testing.assert_close(rebuilt, weight, **tol, msg=f"table {table} after {STEPS} steps")


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
