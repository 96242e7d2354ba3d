"""Row-wise edge cases against the unsharded module: ranks that hold no rows, and ranks with no ids.

A collective is entered by every rank or it hangs, so a rank that holds no block of a row-wise
table (a table with fewer rows than ranks, or an empty block in an explicit plan), a rank whose
block receives no ids in a step, and a rank with an empty batch must all take part in the
forward's and the backward's all-to-alls like their peers. Each case is a ``check_sharding``:
3 steps on a gloo group of 3 or 4 processes (the pooled workers of conftest.py, which time a hung
case out) on hand-laid batches, compared with the unsharded module on the concatenation of every
rank's batch: outputs, dense gradients, the tables' gradients (plain mode) and the tables after
the steps.

Two training modes: ``plain`` (no fused optimizer: the tables are parameters that get ``.grad``
and a torch SGD with momentum and weight decay updates them, so a shard that gets no gradient where
the unsharded table gets a zero one would be decayed differently) and ``sgd`` (fused SGD; the dense
head has the same momentum SGD).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
import torch

from shardrec.distributed.sharding_plan import row_wise, table_wise
from shardrec.distributed.types import ParameterSharding, ShardingType, ShardMetadata
from shardrec.testing import EmbeddingModel, GlobalBatch, WorkerPool, check_sharding

from ._tables import SEQUENCE_DIM, table_model

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
EC_DIM = SEQUENCE_DIM
STEPS = 3
LR = 0.05
# Momentum and weight decay: a shard that gets no gradient where the unsharded table gets a zero
# one would be stepped differently.
DENSE_OPTIMIZER = functools.partial(torch.optim.SGD, lr=LR, momentum=0.9, weight_decay=0.01)


def model(kind: str, mode: str, pooling: str = "SUM", weighted: bool = False) -> EmbeddingModel:
    fused = None if mode == "plain" else {"optimizer": mode, "learning_rate": LR}
    return table_model(TABLES, kind, fused, pooling=pooling, weighted=weighted)


def edge_batch(
    step: int,
    world: int,
    *,
    sizes: Sequence[int] | None,
    silent_rank: int | None,
    weighted: bool,
) -> GlobalBatch:
    """The global batch of ``step``: ``sizes`` samples per rank (default 2 or 3).

    Feature "a" (table "tiny") reads only row 1 at step 0 and only row 0 at step 1, so the owner
    of the other row receives no ids; ``silent_rank``'s samples have no "a" ids at all.
    """
    per_rank = list(sizes) if sizes is not None else [2 + r % 2 for r in range(world)]
    g = torch.Generator().manual_seed(2000 + step)
    lengths = torch.randint(0, 4, (len(KEYS), sum(per_rank)), generator=g)
    if silent_rank is not None:
        lo = sum(per_rank[:silent_rank])
        lengths[KEYS.index("a"), lo : lo + per_rank[silent_rank]] = 0
    ids = []
    for k, f in enumerate(KEYS):
        n = int(lengths[k].sum())
        if f == "a" and step < 2:
            ids.append(torch.full((n,), 1 - step, dtype=torch.int64))
        else:
            ids.append(torch.randint(0, ROWS[f], (n,), generator=g))
    wts = [torch.rand(x.numel(), generator=g) + 0.5 for x in ids]
    return GlobalBatch(KEYS, lengths, ids, wts if weighted else None, per_rank)


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


def make_plan(layout: str, kind: str, world: int) -> dict[str, ParameterSharding]:
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
    return plan


def check(
    pool: WorkerPool,
    world: int,
    *,
    kind: str,
    mode: str,
    layout: str,
    sizes: Sequence[int] | None = None,
    silent_rank: int | None = None,
    pooling: str = "SUM",
    weighted: bool = False,
) -> None:
    """Outputs, dense (and per-id weights') gradients, the tables' gradients (plain mode) at
    every step, and the tables and optimizer state after the steps, against the unsharded
    module."""
    plan = functools.partial(make_plan, layout, kind)
    report = check_sharding(
        model(kind, mode, pooling, weighted),
        plan=plan,
        world_size=world,
        steps=STEPS,
        batches=functools.partial(
            edge_batch, sizes=sizes, silent_rank=silent_rank, weighted=weighted
        ),
        dense_optimizer=DENSE_OPTIMIZER,
        pool=pool,
    )
    if mode == "plain":
        # Every shard that holds rows had its gradient compared at every step (a zero block
        # where it received no ids, never none).
        blocks = sum(1 for ps in plan(world).values() for s in ps.shards if s.sizes[0])
        grads = [c for c in report.checked if c.startswith("what table gradient")]
        assert len(grads) == STEPS * blocks, grads


MODES = ["plain", "sgd"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["all_rw", "tiny_rw", "gap"])
@pytest.mark.parametrize("world", [3, 4])
def test_ranks_without_rows(dist_pool: WorkerPool, world: int, layout: str, mode: str) -> None:
    check(dist_pool, world, kind="ebc", mode=mode, layout=layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [3, 4])
def test_rank_with_empty_batch(dist_pool: WorkerPool, world: int, mode: str) -> None:
    sizes = [2, 0, 3, 1][:world]
    check(dist_pool, world, kind="ebc", mode=mode, layout="tiny_rw", sizes=sizes)
    check(dist_pool, world, kind="ebc", mode=mode, layout="all_rw", sizes=sizes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [3, 4])
def test_rank_sending_no_ids(dist_pool: WorkerPool, world: int, mode: str) -> None:
    check(dist_pool, world, kind="ebc", mode=mode, layout="all_rw", silent_rank=world - 1)
    check(dist_pool, world, kind="ebc", mode=mode, layout="tiny_rw", silent_rank=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [3, 4])
def test_embedding_collection(dist_pool: WorkerPool, world: int, mode: str) -> None:
    check(dist_pool, world, kind="ec", mode=mode, layout="tiny_rw")
    check(dist_pool, world, kind="ec", mode=mode, layout="gap", sizes=[2, 0, 3, 1][:world])
    check(dist_pool, world, kind="ec", mode=mode, layout="all_rw", silent_rank=1)


@pytest.mark.parametrize("mode", MODES)
def test_mean_pooling_and_weights(dist_pool: WorkerPool, mode: str) -> None:
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
