"""Gradients to a KJT's per-id weights through every sharding, against the unsharded module.

The per-id weights of a weighted EmbeddingBagCollection travel with the ids in the input
all-to-all; when they require grad, their gradient comes back in backward along the reverse route.
Every rank must then enter that backward all-to-all, including one that holds no block of any
table (a 2-row table at world size 3) and so never looks up the weights it received: before the fix
such a rank left its peers waiting. Each case trains 3 steps on a gloo group of 3 processes (the
pooled workers of conftest.py) and compares, within 1e-5, the gradient of every rank's KJT weights,
the outputs and the tables after the steps with the unsharded module on the concatenation of every
rank's batch. ``plain``: the tables get ``.grad`` and a torch SGD updates them; ``sgd``: fused SGD
(FBGEMM's kernel for SUM where installed, the torch kernel otherwise).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise
from shardrec.distributed.types import ParameterSharding

from ._reference import (
    TOL,
    Model,
    assert_outputs_match,
    assert_tables_match,
    build_model,
    local_shards,
    rank_entries,
    rank_kjt,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

WORLD = 3
# (name, rows, dim, features): "tiny" has fewer rows than ranks.
TABLES = [
    ("tiny", 2, 4, ["a"]),
    ("small", 3, 8, ["b"]),
    ("big", 9, 12, ["c", "d"]),
]
KEYS = ["d", "a", "c", "b"]  # not the module's order
ROWS = {f: r for _, r, _, fs in TABLES for f in fs}
STEPS = 3
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


def build(mode: str, pooling: str) -> Model:
    # squash: the weights' gradient depends on the rows looked up, not only on the dense layer.
    fused = None if mode == "plain" else {"optimizer": mode, "learning_rate": LR}
    return build_model(
        "ebc", TABLES, seed=321, fused=fused, pooling=pooling, weighted=True, squash=True
    )


def make_batch(
    step: int, sizes: list[int], rank: int | None, needs_grad: bool = True
) -> KeyedJaggedTensor:
    """The global batch (rank None) or rank ``rank``'s slice of it, with weights that require
    grad (unless ``needs_grad`` is False); the same numbers everywhere."""
    g = torch.Generator().manual_seed(3000 + step)
    lengths = torch.randint(0, 4, (len(KEYS), sum(sizes)), generator=g)
    ids = [
        torch.randint(0, ROWS[f], (int(lengths[k].sum()),), generator=g) for k, f in enumerate(KEYS)
    ]
    wts = [torch.rand(x.numel(), generator=g) + 0.5 for x in ids]
    return rank_kjt(KEYS, lengths, ids, wts, sizes, rank, weights_need_grad=needs_grad)


def case_train(env: ShardingEnv, **kw: Any) -> dict[str, Any]:
    world, rank = env.world_size, env.rank
    model = build(kw["mode"], kw["pooling"])
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(kw["layout"]))
    # Shards of sharded tables (plain mode) get the sum of every rank's gradient; what DDP
    # holds (the dense layer, data-parallel tables) gets the average, scaled back to the sum.
    sharded = {
        id(p)
        for m in dmp.module.emb.modules()
        if hasattr(m, "local_tables") and not getattr(m, "replicated", False)
        for p in m.parameters()
    }
    params = [p for p in dmp.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    outputs, weight_grads = [], []
    for step in range(STEPS):
        batch = make_batch(step, kw["sizes"], rank, needs_grad=rank != kw["frozen_rank"])
        rows, loss = dmp(batch)
        loss.backward()
        outputs.append(rows.detach().clone())
        grad = batch.weights().grad
        weight_grads.append(None if grad is None else grad.clone())
        for p in params:
            if id(p) not in sharded and p.grad is not None:
                p.grad *= world
        opt.step()
        opt.zero_grad()
    return {"outputs": outputs, "weight_grads": weight_grads, "shards": local_shards(dmp)}


def reference(kw: dict[str, Any]) -> dict[str, Any]:
    model = build(kw["mode"], kw["pooling"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    outputs, weight_grads = [], []
    for step in range(STEPS):
        batch = make_batch(step, kw["sizes"], None)
        rows, loss = model(batch)
        loss.backward()
        outputs.append(rows.detach().clone())
        weight_grads.append(batch.weights().grad)
        opt.step()
        opt.zero_grad()
    return {
        "outputs": outputs,
        "weight_grads": weight_grads,
        "weights": {n: w.detach() for n, w in model.emb.lookup.table_weights().items()},
    }


def rank_weight_grad(full: torch.Tensor, sizes: list[int], rank: int, step: int) -> torch.Tensor:
    """The entries of the global batch's weight gradient that belong to rank ``rank``'s KJT."""
    lengths = make_batch(step, sizes, None).lengths().view(len(KEYS), -1)
    return rank_entries(lengths, torch.split(full, lengths.sum(1).tolist()), sizes, rank)


def check(dist_pool: Any, **kw: Any) -> None:
    kw.setdefault("sizes", [2, 3, 2])
    kw.setdefault("pooling", "SUM")
    kw.setdefault("frozen_rank", None)
    sizes = kw["sizes"]
    results = dist_pool.run(WORLD, case_train, **kw)
    ref = reference(kw)
    assert_outputs_match(results, [torch.split(rows, sizes) for rows in ref["outputs"]])
    for step, ref_grad in enumerate(ref["weight_grads"]):
        assert ref_grad is not None
        for r, result in enumerate(results):
            grad = result["weight_grads"][step]
            if r == kw["frozen_rank"]:
                assert grad is None, f"rank {r}'s weights need no gradient but got one"
                continue
            assert grad is not None, f"rank {r}'s KJT weights got no gradient at step {step}"
            torch.testing.assert_close(
                grad,
                rank_weight_grad(ref_grad, sizes, r, step),
                **TOL,
                msg=f"weights' gradient, rank {r}, step {step}",
            )
    assert_tables_match(results, ref["weights"])


@pytest.mark.parametrize("mode", ["plain", "sgd"])
@pytest.mark.parametrize("layout", ["tw", "rw", "rw_tiny", "cw", "dp", "mixed"])
def test_weights_get_the_unsharded_gradient(dist_pool: Any, layout: str, mode: str) -> None:
    check(dist_pool, layout=layout, mode=mode)


@pytest.mark.parametrize("layout", ["tw", "rw", "rw_tiny", "cw", "mixed"])
def test_mean_pooling(dist_pool: Any, layout: str) -> None:
    # Row-wise looks MEAN tables up as SUM and divides after the output exchange.
    check(dist_pool, layout=layout, mode="sgd", pooling="MEAN")


@pytest.mark.parametrize("layout", ["tw", "rw_tiny", "mixed"])
def test_rank_with_empty_batch(dist_pool: Any, layout: str) -> None:
    # Rank 1 sends no ids and no weights, and still gets (an empty) gradient for them.
    check(dist_pool, layout=layout, mode="sgd", sizes=[2, 0, 3])


@pytest.mark.parametrize("layout", ["tw", "rw", "rw_tiny"])
def test_one_rank_weights_need_no_gradient(dist_pool: Any, layout: str) -> None:
    # Its peers' weights do: it must still run the weights' backward all-to-all with them.
    check(dist_pool, layout=layout, mode="sgd", frozen_rank=2)
