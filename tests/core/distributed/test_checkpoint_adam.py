"""A DMP trained with fused Adam resumes exactly from a checkpoint: the step counter (Adam's bias
correction) is saved with the moments, and loads at another world size, under another plan, and
into an unsharded module.

Train at world size 2 (row-, table- and column-wise tables), save after 2 steps, take a third
step; then load the checkpoint at world size 1 and 3 under other plans, and into the unsharded
module, take the same third step, and compare the outputs on a fresh batch. Only the fused
optimizer trains here: the global batch is the same at every world size, so the embedding updates
are too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.sharding_plan import column_wise, row_wise, table_wise
from shardrec.testing import GlobalBatch

pytestmark = pytest.mark.multiprocess

TABLES = [("t0", 7, 4, ["f0"]), ("t1", 10, 8, ["f1", "f2"]), ("t2", 13, 4, ["f3"])]
KEYS = ["f0", "f1", "f2", "f3"]
GLOBAL_BATCH = 6  # divides by 1, 2 and 3
SAVED_STEP = 2


class Model(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        configs = [
            EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f)
            for n, r, d, f in TABLES
        ]
        self.ebc = EmbeddingBagCollection(
            configs,
            fused_params={"optimizer": "adam", "learning_rate": 0.05, "beta1": 0.8, "beta2": 0.9},
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        rows: torch.Tensor = self.ebc(kjt).values()
        return rows


def make_batch(seed: int, rank: int, world: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    rows = {f: r for _, r, _, fs in TABLES for f in fs}
    lengths = torch.randint(1, 4, (len(KEYS), GLOBAL_BATCH), generator=g)
    ids = [
        torch.cat([torch.randint(0, rows[f], (int(n),), generator=g) for n in lengths[k]])
        for k, f in enumerate(KEYS)
    ]
    return GlobalBatch(KEYS, lengths, ids, None, [GLOBAL_BATCH // world] * world).kjt(rank)


def train_step(model: nn.Module, seed: int, rank: int, world: int) -> None:
    rows = model(make_batch(seed, rank, world))
    (rows * torch.arange(1, rows.shape[1] + 1, dtype=rows.dtype)).sum().backward()


def make_plan(spec: dict[str, str], world: int) -> ShardingPlan:
    plan = {}
    for name, r, d, _ in TABLES:
        kind = spec[name]
        if kind == "rw":
            plan[name] = row_wise(r, d, world)
        elif kind == "cw":
            plan[name] = column_wise(r, d, [world - 1, 0])
        else:
            plan[name] = table_wise(world - 1, r, d)
    return ShardingPlan({"ebc": plan})


def case_train_save(env: ShardingEnv, root: str) -> torch.Tensor:
    dmp = DistributedModelParallel(Model(seed=0), env=env, plan=make_plan(SAVE, env.world_size))
    for step in range(SAVED_STEP):
        train_step(dmp, step, env.rank, env.world_size)
    save(root, dmp, step=SAVED_STEP, pg=env.pg)
    train_step(dmp, SAVED_STEP, env.rank, env.world_size)
    with torch.no_grad():
        rows: torch.Tensor = dmp(make_batch(99, env.rank, env.world_size))
    return rows


def case_load_continue(env: ShardingEnv, root: str, spec: dict[str, str]) -> torch.Tensor:
    dmp = DistributedModelParallel(Model(seed=1), env=env, plan=make_plan(spec, env.world_size))
    assert load(root, dmp, pg=env.pg) == SAVED_STEP
    train_step(dmp, SAVED_STEP, env.rank, env.world_size)
    with torch.no_grad():
        rows: torch.Tensor = dmp(make_batch(99, env.rank, env.world_size))
    return rows


SAVE = {"t0": "rw", "t1": "tw", "t2": "cw"}
LOADS = [(1, {"t0": "tw", "t1": "cw", "t2": "rw"}), (3, {"t0": "cw", "t1": "rw", "t2": "tw"})]


def test_fused_adam_resumes_exactly_across_world_sizes_and_plans(
    dist_pool: Any, tmp_path: Path
) -> None:
    root = str(tmp_path / "ck")
    before = torch.cat(dist_pool.run(2, case_train_save, root=root))

    # Unsharded: the checkpoint's step counter is there, and one more step matches.
    model = Model(seed=2)
    load(root, model)
    states = model.ebc.lookup.optimizer_states()
    assert {n: int(s["step"]) for n, s in states.items()} == {n: SAVED_STEP for n, *_ in TABLES}
    train_step(model, SAVED_STEP, 0, 1)
    with torch.no_grad():
        unsharded = model(make_batch(99, 0, 1))
    torch.testing.assert_close(unsharded, before, rtol=1e-5, atol=1e-6)

    # Without the counter (as before it was saved) the resumed step would differ.
    stale = Model(seed=2)
    load(root, stale)
    for s in stale.ebc.lookup.optimizer_states().values():
        s["step"].zero_()
    train_step(stale, SAVED_STEP, 0, 1)
    with torch.no_grad():
        assert not torch.allclose(stale(make_batch(99, 0, 1)), before, rtol=1e-4, atol=1e-4)

    for world, spec in LOADS:
        after = torch.cat(dist_pool.run(world, case_load_continue, root=root, spec=spec))
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
