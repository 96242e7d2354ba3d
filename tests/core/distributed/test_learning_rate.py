"""``shardrec.kernels.set_learning_rate`` reaches the fused lookups inside DistributedModelParallel.

Each sharding type keeps its local lookup as a submodule; after ``set_learning_rate(dmp, lr)`` a
training step equals the same step of a DMP built with ``learning_rate=lr``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise
from shardrec.kernels import TableBatchedEmbedding, fused_learning_rates, set_learning_rate

pytestmark = pytest.mark.multiprocess

OLD_LR, NEW_LR = 0.5, 0.05
SHAPES = {"tw": (40, 8), "rw": (60, 8), "cw": (30, 8), "dp": (20, 8)}


def _ebc(lr: float) -> EmbeddingBagCollection:
    torch.manual_seed(11)
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=t, num_embeddings=r, embedding_dim=d, feature_names=[f"f_{t}"])
            for t, (r, d) in SHAPES.items()
        ],
        fused_params={"optimizer": "sgd", "learning_rate": lr},
    )


def _plan(world_size: int) -> ShardingPlan:
    ranks = list(range(world_size))
    return ShardingPlan(
        {
            "": {
                "tw": table_wise(world_size - 1, *SHAPES["tw"]),
                "rw": row_wise(*SHAPES["rw"], world_size),
                "cw": column_wise(*SHAPES["cw"], ranks),
                "dp": data_parallel(*SHAPES["dp"], world_size),
            }
        }
    )


def _kjt(rank: int) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(rank)
    batch = 4
    lengths = torch.randint(1, 3, (len(SHAPES) * batch,), generator=gen)
    values = torch.cat(
        [
            torch.randint(0, r, (int(lengths[i * batch : (i + 1) * batch].sum()),), generator=gen)
            for i, (r, _) in enumerate(SHAPES.values())
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f_{t}" for t in SHAPES], values=values, lengths=lengths
    )


def _local_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, sub in model.named_modules():
        if isinstance(sub, TableBatchedEmbedding) and sub.optimizer is not None:
            for table, w in sub.table_weights().items():
                out[f"{name}/{table}"] = w.clone()
    return out


def case_set_learning_rate_in_dmp(env: ShardingEnv) -> dict[str, Any]:
    models = {
        lr_kind: DistributedModelParallel(_ebc(lr), env=env, plan=_plan(env.world_size))
        for lr_kind, lr in (("changed", OLD_LR), ("kept", OLD_LR), ("fresh", NEW_LR))
    }
    before = fused_learning_rates(models["changed"])
    updated = set_learning_rate(models["changed"], NEW_LR)
    after = fused_learning_rates(models["changed"])
    kjt = _kjt(env.rank)
    for model in models.values():
        model(kjt).values().square().sum().backward()
    tables = {k: _local_tables(m) for k, m in models.items()}
    return {
        "updated": updated,
        "before": before,
        "after": after,
        "same_as_fresh": all(
            torch.allclose(w, tables["fresh"][n]) for n, w in tables["changed"].items()
        ),
        "differs_from_kept": any(
            not torch.allclose(w, tables["kept"][n]) for n, w in tables["changed"].items()
        ),
        "names": sorted(tables["changed"]),
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_set_learning_rate_reaches_every_sharded_lookup(dist_pool: Any, world_size: int) -> None:
    results = dist_pool.run(world_size, case_set_learning_rate_in_dmp)
    for rank, r in enumerate(results):
        assert r["updated"] >= 1, f"rank {rank}: no fused lookup found in the DMP"
        assert r["updated"] == len(r["before"]) == len(r["after"])
        assert all(lr == pytest.approx(OLD_LR) for lr in r["before"].values())
        assert all(lr == pytest.approx(NEW_LR) for lr in r["after"].values())
        assert r["same_as_fresh"], f"rank {rank}: step after set_learning_rate != fresh DMP"
        assert r["differs_from_kept"], f"rank {rank}: the new rate changed nothing"
    held = {n.split("/")[-1] for r in results for n in r["names"]}
    # Every fused sharding type's tables were reached (local names carry the table's name).
    for table in ("tw", "rw", "cw"):
        assert any(table in n for n in held), f"no local lookup of table {table!r}: {held}"
