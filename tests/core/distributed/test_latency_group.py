"""The latency simulator (``shardrec.distributed.latency``): a DMP trained on a delayed group
learns exactly what it learns on plain gloo, and a collective in flight leaves the caller free
until its latency has passed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardrec import EmbeddingBagConfig
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.latency import DELAYED_BACKEND, new_delayed_group
from shardrec.distributed.sharding_plan import row_wise, table_wise
from shardrec.testing import EMBEDDING_FQN, EmbeddingModel, GlobalBatch

pytestmark = pytest.mark.multiprocess

TABLES = [
    EmbeddingBagConfig(name="t0", num_embeddings=7, embedding_dim=4, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
]
WORLD = 4  # the whole pool: a new group is made by every rank of the default group


def _train(env: ShardingEnv) -> dict[str, Any]:
    spec = EmbeddingModel(tables=TABLES, fused_params={"optimizer": "sgd", "learning_rate": 0.1})
    model = spec.build(seed=3)
    plan = ShardingPlan({"emb": {"t0": table_wise(1, 7, 4), "t1": row_wise(10, 4, WORLD)}})
    dmp = DistributedModelParallel(model, env=env, plan=plan)
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=0.1)
    outputs = []
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        lengths = torch.randint(0, 3, (2, 3 * WORLD), generator=g)
        ids = [torch.randint(0, 7, (int(lengths[k].sum()),), generator=g) for k in range(2)]
        batch = GlobalBatch(["f0", "f1"], lengths, ids, None, [3] * WORLD)
        rows, loss = dmp(batch.kjt(env.rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        outputs.append(rows.detach().clone())
    shards = {
        table: [(s.tensor.clone(), s.offsets) for s in held.weight]
        for table, held in dmp.local_table_shards()[EMBEDDING_FQN].items()
    }
    return {"outputs": outputs, "shards": shards, "dense": model.dense.weight.detach()}


def case_delayed_vs_gloo(env: ShardingEnv) -> dict[str, Any]:
    group = new_delayed_group(0.002)
    assert group is not None
    plain = _train(env)
    delayed = _train(ShardingEnv.from_process_group(group))
    return {
        "plain": plain,
        "delayed": delayed,
        "issued": group.issued,
        "backend": dist.get_backend(group),
    }


def test_a_delayed_group_trains_exactly_like_gloo(dist_pool: Any) -> None:
    for res in dist_pool.run(WORLD, case_delayed_vs_gloo):
        assert res["backend"] == DELAYED_BACKEND
        assert res["issued"] > 0  # the sharders' collectives and DDP's went through it
        for a, b in zip(res["plain"]["outputs"], res["delayed"]["outputs"], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(res["plain"]["dense"], res["delayed"]["dense"])
        for table, blocks in res["plain"]["shards"].items():
            for (a, _), (b, _) in zip(blocks, res["delayed"]["shards"][table], strict=True):
                assert torch.equal(a, b)


def case_in_flight(env: ShardingEnv) -> dict[str, Any]:
    group = new_delayed_group(0.5)
    assert group is not None
    x = torch.full((3,), float(env.rank))
    work = dist.all_reduce(x, group=group, async_op=True)
    assert work is not None
    in_flight = not work.is_completed()  # the caller is free: half a second is left to wait
    work.wait()
    return {"in_flight": in_flight, "done": work.is_completed(), "sum": x.tolist()}


def test_a_collective_completes_after_its_latency_without_blocking_the_caller(
    dist_pool: Any,
) -> None:
    total = float(sum(range(WORLD)))
    for res in dist_pool.run(WORLD, case_in_flight):
        assert res == {"in_flight": True, "done": True, "sum": [total] * 3}


def test_negative_latency_is_refused() -> None:
    with pytest.raises(ValueError, match="latency_s must be >= 0"):
        new_delayed_group(-1.0)
