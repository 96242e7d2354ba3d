"""DistributedModelParallel checkpoints across plans and world sizes, end to end.

Train a DMP at world size 2 under one plan (fused row-wise Adagrad, dense Adagrad), save; load at
world sizes 1, 3 and 4 under other plans (each table moves between table-, row-, column-wise and
data-parallel). Then: the forward outputs on a fresh batch equal the saved model's, and saving
again gives the same weights and fused optimizer state as the first checkpoint, as read by an
unsharded module.
"""

from __future__ import annotations

from pathlib import Path
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
)
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise
from shardrec.testing import GlobalBatch

pytestmark = pytest.mark.multiprocess

TABLES = [("t0", 7, 4, ["f0"]), ("t1", 10, 8, ["f1", "f2"]), ("t2", 13, 4, ["f3"])]
KEYS = ["f0", "f1", "f2", "f3"]
GLOBAL_BATCH = 12  # divides by 1, 2, 3 and 4
LR = 0.1


class Model(nn.Module):
    def __init__(self, seed: int, optimizer: str = "rowwise_adagrad") -> None:
        super().__init__()
        torch.manual_seed(seed)
        configs = [
            EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f)
            for n, r, d, f in TABLES
        ]
        self.ebc = EmbeddingBagCollection(
            configs, fused_params={"optimizer": optimizer, "learning_rate": LR}
        )
        self.top = nn.Linear(sum(d * len(f) for _, _, d, f in TABLES), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.ebc(kjt).values()
        return rows, self.top(rows).sum()


def make_batch(seed: int, rank: int, world: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    rows = {f: r for _, r, _, fs in TABLES for f in fs}
    lengths = torch.randint(0, 4, (len(KEYS), GLOBAL_BATCH), generator=g)
    ids = [
        torch.cat([torch.randint(0, rows[f], (int(n),), generator=g) for n in lengths[k]])
        for k, f in enumerate(KEYS)
    ]
    return GlobalBatch(KEYS, lengths, ids, None, [GLOBAL_BATCH // world] * world).kjt(rank)


def make_plan(spec: dict[str, tuple[str, list[int]]], world: int) -> ShardingPlan:
    plan = {}
    for name, r, d, _ in TABLES:
        kind, ranks = spec[name]
        if kind == "tw":
            plan[name] = table_wise(ranks[0], r, d)
        elif kind == "rw":
            plan[name] = row_wise(r, d, world)
        elif kind == "cw":
            plan[name] = column_wise(r, d, ranks)
        else:
            plan[name] = data_parallel(r, d, world)
    return ShardingPlan({"ebc": plan})


def dense_optimizer(dmp: DistributedModelParallel) -> torch.optim.Optimizer:
    return torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=LR)


def case_train_save(
    env: ShardingEnv, root: str, spec: dict[str, Any], optimizer: str
) -> torch.Tensor:
    model = Model(seed=0, optimizer=optimizer)
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(spec, env.world_size))
    opt = dense_optimizer(dmp)
    for step in range(2):
        _, loss = dmp(make_batch(step, env.rank, env.world_size))
        loss.backward()
        opt.step()
        opt.zero_grad()
    save(root, dmp, step=2, optimizer=opt, pg=env.pg)
    with torch.no_grad():
        rows, _ = dmp(make_batch(99, env.rank, env.world_size))
    return rows


def case_load_resave(
    env: ShardingEnv, root: str, again: str, spec: dict[str, Any], optimizer: str
) -> torch.Tensor:
    model = Model(seed=1, optimizer=optimizer)
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(spec, env.world_size))
    opt = dense_optimizer(dmp)
    assert load(root, dmp, optimizer=opt, pg=env.pg) == 2
    save(again, dmp, step=2, optimizer=opt, pg=env.pg)
    with torch.no_grad():
        rows, _ = dmp(make_batch(99, env.rank, env.world_size))
    return rows


def unsharded_view(root: str, optimizer: str) -> dict[str, torch.Tensor]:
    """Weights and fused state of a checkpoint, as an unsharded module loads them."""
    model = Model(seed=2, optimizer=optimizer)
    load(root, model)
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for table, states in model.ebc.lookup.optimizer_states().items():
        for name, t in states.items():
            out[f"{table}.{name}"] = t.clone()
    return out


# t1 lives on rank 1 alone: rank 0 holds no table-wise shard, yet trains along.
SAVE = {"t0": ("rw", []), "t1": ("tw", [1]), "t2": ("cw", [0, 1])}
LOADS = [
    (1, {"t0": ("tw", [0]), "t1": ("cw", [0, 0]), "t2": ("rw", [])}),
    (3, {"t0": ("cw", [2, 0]), "t1": ("rw", []), "t2": ("tw", [2])}),
    (4, {"t0": ("tw", [3]), "t1": ("cw", [3, 1]), "t2": ("cw", [2, 0])}),
]
SAVE_DP = {"t0": ("dp", []), "t1": ("tw", [1]), "t2": ("tw", [0])}
LOADS_DP = [(3, {"t0": ("rw", []), "t1": ("dp", []), "t2": ("cw", [1, 2])})]


# Data-parallel tables are trained by the dense optimizer; the built-in data-parallel sharder takes
# a module whose fused optimizer keeps no state (SGD) here.
@pytest.mark.parametrize(
    ("saved", "loads", "optimizer"),
    [(SAVE, LOADS, "rowwise_adagrad"), (SAVE_DP, LOADS_DP, "sgd")],
    ids=["tw-rw-cw", "dp"],
)
def test_dmp_checkpoint_reshards(
    dist_pool: Any, tmp_path: Path, saved: dict[str, Any], loads: list[Any], optimizer: str
) -> None:
    root = str(tmp_path / "ck")
    before = torch.cat(
        dist_pool.run(2, case_train_save, root=root, spec=saved, optimizer=optimizer)
    )
    reference = unsharded_view(root, optimizer)
    dp_saved = {n for n, (k, _) in saved.items() if k == "dp"}
    for world, spec in loads:
        again = str(tmp_path / f"again-{world}")
        after = torch.cat(
            dist_pool.run(
                world, case_load_resave, root=root, again=again, spec=spec, optimizer=optimizer
            )
        )
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
        resaved = unsharded_view(again, optimizer)
        assert resaved.keys() == reference.keys()
        for key, value in reference.items():
            table = key.split(".")[1] if key.startswith("ebc.") else key.split(".")[0]
            if key.endswith(".sum") and (table in dp_saved or spec[table][0] == "dp"):
                continue  # a data-parallel table has no fused state on one side
            torch.testing.assert_close(resaved[key], value, rtol=0, atol=0, msg=key)


def case_default_plan_and_state_dict(env: ShardingEnv) -> dict[str, Any]:
    dmp = DistributedModelParallel(Model(seed=0), env=env)
    assert dmp.plan_report is not None  # DMP planned: its planner's report is kept
    sd = dmp.state_dict()
    shapes = {k: tuple(v.size()) for k, v in sd.items()}
    # Write a full, unsharded state dict of another model into the sharded one.
    other = Model(seed=5)
    dmp.load_state_dict(other.state_dict())
    with torch.no_grad():
        rows, _ = dmp(make_batch(7, env.rank, env.world_size))
    return {"plan": str(dmp.plan), "report": str(dmp.plan_report), "shapes": shapes, "rows": rows}


def test_dmp_plans_with_the_planner_and_exposes_unsharded_keys(dist_pool: Any) -> None:
    results = dist_pool.run(3, case_default_plan_and_state_dict)
    assert len({r["plan"] for r in results}) == 1  # rank 0 planned, everyone got the same plan
    assert "why:" in results[0]["report"]
    expected = {f"ebc.embedding_bags.{n}.weight": (r, d) for n, r, d, _ in TABLES}
    expected |= {"top.weight": (1, 24), "top.bias": (1,)}
    assert results[0]["shapes"] == expected
    reference = Model(seed=5)
    with torch.no_grad():
        want = torch.cat([reference(make_batch(7, r, 3))[0] for r in range(3)])
    torch.testing.assert_close(torch.cat([r["rows"] for r in results]), want)


class SeqModel(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        configs = [
            EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=4, feature_names=f)
            for n, r, _, f in TABLES
        ]
        self.ec = EmbeddingCollection(
            tables=configs, fused_params={"optimizer": "rowwise_adagrad", "learning_rate": LR}
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = self.ec(kjt)
        return torch.cat([out[k].values() for k in sorted(out)])


def ec_plan(kind: str, world: int) -> ShardingPlan:
    make = {"rw": lambda r: row_wise(r, 4, world), "tw": lambda r: table_wise(world - 1, r, 4)}
    return ShardingPlan({"ec": {n: make[kind](r) for n, r, _, _ in TABLES}})


def case_ec(env: ShardingEnv, root: str, kind: str, save_it: bool) -> dict[str, Any]:
    dmp = DistributedModelParallel(
        SeqModel(seed=0 if save_it else 3), env=env, plan=ec_plan(kind, env.world_size)
    )
    if save_it:
        dmp(make_batch(0, env.rank, env.world_size)).sum().backward()  # one fused Adagrad step
        save(root, dmp, step=1, pg=env.pg)
    else:
        load(root, dmp, pg=env.pg)
    with torch.no_grad():
        rows = dmp(make_batch(5, env.rank, env.world_size))
    return {"rows": rows, "keys": sorted(dmp.state_dict())}


def test_embedding_collection_checkpoint_reshards(dist_pool: Any, tmp_path: Path) -> None:
    root = str(tmp_path / "ec")
    saved = dist_pool.run(2, case_ec, root=root, kind="rw", save_it=True)
    assert saved[0]["keys"] == [f"ec.embeddings.{n}.weight" for n, *_ in TABLES]
    # The checkpoint, loaded unsharded, reproduces what every rank computed, exactly.
    reference = SeqModel(seed=4)
    load(root, reference)

    def expected(rank: int, world: int) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = reference(make_batch(5, rank, world))
        return out

    for r, res in enumerate(saved):
        torch.testing.assert_close(res["rows"], expected(r, 2), rtol=0, atol=0)
    for world in (1, 3):
        loaded = dist_pool.run(world, case_ec, root=root, kind="tw", save_it=False)
        for r, res in enumerate(loaded):
            torch.testing.assert_close(res["rows"], expected(r, world), rtol=0, atol=0)


def case_collective_plan_error(env: ShardingEnv) -> str:
    from shardrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        PlannerError,
        Topology,
    )
    from shardrec.distributed.plugins import load_sharder_registry

    # Only rank 0 plans: its error reaches every rank, which all raise the same PlannerError.
    wanted = ["no_such_sharding"] if env.rank == 0 else ["row_wise"]
    planner = EmbeddingShardingPlanner(
        Topology(world_size=env.world_size, compute_device="cpu"),
        constraints={"t1": ParameterConstraints(sharding_types=wanted)},
    )
    try:
        planner.collective_plan(Model(seed=0), load_sharder_registry().sharders(), env.pg)
    except PlannerError as error:
        return str(error)
    return "no error"


def test_collective_plan_error_reaches_every_rank(dist_pool: Any) -> None:
    messages = dist_pool.run(2, case_collective_plan_error)
    for message in messages:
        assert "'ebc.t1'" in message
        assert "no_such_sharding" in message


def case_collective_plan_plugin_error(env: ShardingEnv) -> tuple[str, str]:
    from shardrec.distributed.planner import EmbeddingShardingPlanner, RankState, Topology
    from shardrec.distributed.plugins import load_sharder_registry

    def broken_state(module: nn.Module, world_size: int) -> list[RankState]:
        raise TypeError("broken plugin: no state for you")

    # Sharders whose state declaration fails as a plugin's might (only rank 0 asks them).
    sharders = load_sharder_registry().sharders()
    for sharder in sharders:
        sharder.planner_rank_state = broken_state  # type: ignore[attr-defined]
    planner = EmbeddingShardingPlanner(Topology(world_size=env.world_size, compute_device="cpu"))
    try:
        planner.collective_plan(Model(seed=0), sharders, env.pg)
    except Exception as error:  # rank 0 raises the plugin's own error, the others a PlannerError
        return type(error).__name__, str(error)
    return "none", "no error"


def test_a_plugin_error_while_planning_reaches_every_rank(dist_pool: Any) -> None:
    # Only rank 0 plans: before, its plugin's TypeError left the other ranks waiting forever.
    (kind0, message0), (kind1, message1) = dist_pool.run(2, case_collective_plan_plugin_error)
    assert (kind0, message0) == ("TypeError", "broken plugin: no state for you")
    assert kind1 == "PlannerError"
    assert "rank 0" in message1
    assert "broken plugin: no state for you" in message1
