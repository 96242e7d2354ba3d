"""Gradients to a KJT's per-id weights through every sharding, against the unsharded module.

The per-id weights of a weighted EmbeddingBagCollection travel with the ids in the input
all-to-all; when they require grad, their gradient comes back in backward along the reverse route.
Every rank must then enter that backward all-to-all, including one that holds no block of any
table (a 2-row table at world size 3) and so never looks up the weights it received: before the fix
such a rank left its peers waiting. Each case trains 3 steps on a gloo group of 3 processes through
``shardrec.testing.check_sharding``, which compares the gradient of every rank's KJT weights, the
outputs and the tables after the steps with the unsharded module on the concatenation of every
rank's batch. ``plain``: the tables get ``.grad`` and a torch SGD updates them; ``sgd``: fused SGD
(FBGEMM's kernel for SUM where installed, the torch kernel otherwise).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec import EmbeddingBagConfig, PoolingType
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise
from shardrec.distributed.types import ParameterSharding
from shardrec.testing import EmbeddingModel, GlobalBatch, WorkerPool, check_sharding

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

WORLD = 3
# (name, rows, dim, features): "tiny" has fewer rows than ranks.
TABLES = [
    ("tiny", 2, 4, ["a"]),
    ("small", 3, 8, ["b"]),
    ("big", 9, 12, ["c", "d"]),
]
LR = 0.05


def make_plan(layout: str) -> ShardingPlan:
    """Rank 2 holds no block of any table except in ``rw`` (no block of "tiny" there) and ``dp``."""
    specs: dict[str, dict[str, ParameterSharding]] = {
        "tw": {
            "tiny": table_wise(0, 2, 4),
            "small": table_wise(1, 3, 8),
            "big": table_wise(0, 9, 12),
        },
        "rw": {n: row_wise(r, d, WORLD) for n, r, d, _ in TABLES},
        "rw_tiny": {
            "tiny": row_wise(2, 4, WORLD),
            "small": table_wise(1, 3, 8),
            "big": table_wise(0, 9, 12),
        },
        "cw": {
            "tiny": column_wise(2, 4, [0, 1]),
            "small": column_wise(3, 8, [1, 0]),
            "big": column_wise(9, 12, [0, 1, 0]),
        },
        "dp": {n: data_parallel(r, d, WORLD) for n, r, d, _ in TABLES},
        "mixed": {
            "tiny": row_wise(2, 4, WORLD),
            "small": data_parallel(3, 8, WORLD),
            "big": column_wise(9, 12, [1, 0]),
        },
    }
    return ShardingPlan({"emb": specs[layout]})


def model(mode: str, pooling: str = "SUM") -> EmbeddingModel:
    """``plain``: the tables are parameters a torch SGD trains; else that fused optimizer."""
    bags = [
        EmbeddingBagConfig(
            name=n, num_embeddings=r, embedding_dim=d, feature_names=f, pooling=PoolingType(pooling)
        )
        for n, r, d, f in TABLES
    ]
    fused = None if mode == "plain" else {"optimizer": mode, "learning_rate": LR}
    return EmbeddingModel(tables=bags, fused_params=fused, weighted=True)


def check(pool: WorkerPool, layout: str, mode: str, **options: Any) -> None:
    check_sharding(
        model(mode, options.pop("pooling", "SUM")),
        plan=lambda w: make_plan(layout).plan["emb"],
        world_size=WORLD,
        pool=pool,
        **options,
    )


@pytest.mark.parametrize("mode", ["plain", "sgd"])
@pytest.mark.parametrize("layout", ["tw", "rw", "rw_tiny", "cw", "dp", "mixed"])
def test_weights_get_the_unsharded_gradient(dist_pool: WorkerPool, layout: str, mode: str) -> None:
    check(dist_pool, layout, mode)


@pytest.mark.parametrize("layout", ["tw", "rw", "rw_tiny", "cw", "mixed"])
def test_mean_pooling(dist_pool: WorkerPool, layout: str) -> None:
    # Row-wise looks MEAN tables up as SUM and divides after the output exchange.
    check(dist_pool, layout, "sgd", pooling="MEAN")


@pytest.mark.parametrize("layout", ["tw", "rw_tiny", "mixed"])
def test_rank_with_empty_batch(dist_pool: WorkerPool, layout: str) -> None:
    # Rank 1 sends no ids and no weights, and still gets (an empty) gradient for them.
    check(dist_pool, layout, "sgd", empty_rank=1)


def case_one_rank_frozen(env: ShardingEnv, layout: str) -> list[Any]:
    """The same step twice: every rank's weights need a gradient, then all but rank 2's."""
    out = []
    for frozen in (None, 2):
        dmp = DistributedModelParallel(
            model("sgd").build(seed=321), env=env, plan=make_plan(layout)
        )
        rows = {f: r for _, r, _, fs in TABLES for f in fs}
        batch = GlobalBatch.random(rows, [2, 3, 2], seed=5, weighted=True)
        kjt = batch.kjt(env.rank, weights_need_grad=env.rank != frozen)
        out_rows, loss = dmp(kjt)
        loss.backward()
        grad = kjt.weights().grad
        out.append((out_rows.detach(), None if grad is None else grad.clone()))
    return out


@pytest.mark.parametrize("layout", ["tw", "rw", "rw_tiny"])
def test_one_rank_weights_need_no_gradient(dist_pool: WorkerPool, layout: str) -> None:
    # Its peers' weights do: it must still run the weights' backward all-to-all with them, and
    # they get what they get when every rank's weights need one (the unsharded gradient, above).
    for rank, ((rows, grad), (frozen_rows, frozen_grad)) in enumerate(
        dist_pool.run(WORLD, case_one_rank_frozen, layout=layout)
    ):
        assert torch.equal(rows, frozen_rows)
        if rank == 2:
            assert frozen_grad is None, "rank 2's weights need no gradient but got one"
        else:
            assert frozen_grad is not None, f"rank {rank}'s KJT weights got no gradient"
            torch.testing.assert_close(frozen_grad, grad, atol=1e-6, rtol=1e-6)
