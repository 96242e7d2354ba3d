"""Checkpoints saved under one plan and world size load under any other, through DCP.

The sharded side is a small stand-in that holds per-rank shards exactly as a sharded module exposes
them (``local_table_shards``: weight and fused-optimizer state views with global offsets), so these
tests pin down the checkpoint layer on its own; the DMP end-to-end tests build on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shardrec.distributed import LocalShard, ShardingEnv, TableShards
from shardrec.distributed.checkpoint import (
    CheckpointError,
    latest,
    load,
    load_sharded_state_dict,
    save,
    sharded_state_dict,
)
from shardrec.modules import EmbeddingBagCollection
from shardrec.modules.configs import EmbeddingBagConfig

pytestmark = pytest.mark.multiprocess

TABLES = {"t0": (7, 8), "t1": (5, 8), "t2": (11, 4)}  # rows, dim: uneven on purpose
Box = tuple[int, int, int, int, int]  # row offset, col offset, rows, cols, rank


def truth(table: str, salt: float = 0.0) -> dict[str, torch.Tensor]:
    rows, dim = TABLES[table]
    base = 100.0 * (list(TABLES).index(table) + 1) + salt
    weight = base + torch.arange(rows * dim, dtype=torch.float32).view(rows, dim) / 64
    return {"weight": weight, "sum": base / 1000 + torch.arange(rows, dtype=torch.float32)}


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, off = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((off, size))
        off += size
    return out


def layout(kind: str, table: str, world: int, rank_hint: int = 0) -> tuple[list[Box], bool]:
    """The shards of ``table`` under sharding ``kind`` at ``world`` ranks; True if replicated."""
    rows, dim = TABLES[table]
    if kind == "tw":
        return [(0, 0, rows, dim, rank_hint % world)], False
    if kind == "rw":
        return [(o, 0, n, dim, r) for r, (o, n) in enumerate(_split(rows, world)) if n], False
    if kind == "cw":
        parts = min(world, 2) if dim >= 2 else 1
        return [
            (0, o, rows, n, (rank_hint + r) % world) for r, (o, n) in enumerate(_split(dim, parts))
        ], False
    if kind == "dp":
        return [(0, 0, rows, dim, r) for r in range(world)], True
    raise ValueError(kind)


class StandInShardedEBC(nn.Module):
    """Holds this rank's shards of each table (weight + row-wise Adagrad ``sum``)."""

    unsharded_module_type = EmbeddingBagCollection

    def __init__(self, plan: dict[str, str], rank: int, world: int, fill: str) -> None:
        super().__init__()
        self._held: dict[str, TableShards] = {}
        for i, (table, kind) in enumerate(plan.items()):
            boxes, replicated = layout(kind, table, world, rank_hint=i)
            full = truth(table)
            weights, states = [], []
            for r0, c0, nr, nc, rank_of in boxes:
                if rank_of != rank:
                    continue
                w = full["weight"][r0 : r0 + nr, c0 : c0 + nc].clone()
                s = full["sum"][r0 : r0 + nr].clone()
                if fill == "zeros":
                    w.zero_()
                    s.zero_()
                weights.append(LocalShard(w, (r0, c0), TABLES[table]))
                states.append(LocalShard(s, (r0,), (TABLES[table][0],)))
            self._held[table] = TableShards(
                weight=weights, optimizer_state={"sum": states}, replicated=replicated
            )

    def local_table_shards(self) -> dict[str, TableShards]:
        return self._held


class Model(nn.Module):
    def __init__(self, sparse: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse
        self.dense = nn.Linear(3, 2)


def sharded_model(plan: dict[str, str], env: ShardingEnv, fill: str) -> Model:
    model = Model(StandInShardedEBC(plan, env.rank, env.world_size, fill))
    with torch.no_grad():
        model.dense.weight.copy_(torch.arange(6.0).view(2, 3) if fill == "truth" else 0.0)
        model.dense.bias.fill_(7.0 if fill == "truth" else 0.0)
    return model


def local_view(model: Model) -> dict[str, list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]]:
    sparse = model.sparse
    assert isinstance(sparse, StandInShardedEBC)
    return {
        t: [
            (w.offsets, w.tensor.clone(), s.tensor.clone())
            for w, s in zip(ts.weight, ts.optimizer_state["sum"], strict=True)
        ]
        for t, ts in sparse.local_table_shards().items()
    }


def case_save(env: ShardingEnv, root: str, plan: dict[str, str], step: int) -> str:
    model = sharded_model(plan, env, "truth")
    return str(save(root, model, step=step, pg=env.pg))


def case_load(env: ShardingEnv, root: str, plan: dict[str, str]) -> dict[str, Any]:
    model = sharded_model(plan, env, "zeros")
    step = load(root, model, pg=env.pg)
    return {
        "step": step,
        "tables": local_view(model),
        "dense": (model.dense.weight.detach().clone(), model.dense.bias.detach().clone()),
    }


def check_loaded(results: list[dict[str, Any]], step: int) -> None:
    for res in results:
        assert res["step"] == step
        assert torch.equal(res["dense"][0], torch.arange(6.0).view(2, 3))
        assert torch.equal(res["dense"][1], torch.full((2,), 7.0))
        for table, shards in res["tables"].items():
            full = truth(table)
            for (r0, c0), w, s in shards:
                rows, cols = w.shape
                assert torch.equal(w, full["weight"][r0 : r0 + rows, c0 : c0 + cols]), table
                assert torch.equal(s, full["sum"][r0 : r0 + rows]), table
    held = {t for res in results for t, shards in res["tables"].items() if shards}
    assert held == set(TABLES)


SAVE_PLAN = {"t0": "rw", "t1": "tw", "t2": "cw"}
SAVE_PLAN_2 = {"t0": "dp", "t1": "cw", "t2": "rw"}
LOAD_PLANS = [
    (1, {"t0": "tw", "t1": "rw", "t2": "dp"}),
    (3, {"t0": "cw", "t1": "rw", "t2": "tw"}),
    (4, {"t0": "dp", "t1": "cw", "t2": "rw"}),
    (3, {"t0": "rw", "t1": "dp", "t2": "cw"}),
]


def test_save_at_two_load_at_one_three_four_under_other_plans(
    dist_pool: Any, tmp_path: Path
) -> None:
    root_a, root_b = str(tmp_path / "a"), str(tmp_path / "b")
    paths = dist_pool.run(2, case_save, root=root_a, plan=SAVE_PLAN, step=7)
    assert paths == [str(Path(root_a) / "step-00000007")] * 2
    dist_pool.run(2, case_save, root=root_b, plan=SAVE_PLAN_2, step=9)
    for world, plan in LOAD_PLANS:
        check_loaded(dist_pool.run(world, case_load, root=root_a, plan=plan), 7)
        check_loaded(dist_pool.run(world, case_load, root=root_b, plan=plan), 9)
    assert latest(root_a) == Path(root_a) / "step-00000007"


def test_sharded_checkpoint_loads_into_unsharded_module(dist_pool: Any, tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    dist_pool.run(2, case_save, root=root, plan=SAVE_PLAN, step=3)
    configs = [
        EmbeddingBagConfig(num_embeddings=r, embedding_dim=d, name=t, feature_names=[f"f_{t}"])
        for t, (r, d) in TABLES.items()
    ]
    ebc = EmbeddingBagCollection(configs, fused_params={"optimizer": "rowwise_adagrad"})
    model = Model(ebc)
    assert load(root, model) == 3
    states = ebc.lookup.optimizer_states()
    for t in TABLES:
        assert torch.equal(ebc.state_dict()[f"embedding_bags.{t}.weight"], truth(t)["weight"])
        assert torch.equal(states[t]["sum"], truth(t)["sum"])
    assert torch.equal(model.dense.bias.detach(), torch.full((2,), 7.0))
    # A module without fused optimizer state loads the weights and ignores the optimizer part.
    plain = Model(EmbeddingBagCollection(configs))
    load(root, plain)
    assert torch.equal(plain.state_dict()["sparse.embedding_bags.t2.weight"], truth("t2")["weight"])


def case_load_unsharded_sd(env: ShardingEnv, plan: dict[str, str]) -> dict[str, Any]:
    model = sharded_model(plan, env, "zeros")
    full = {f"sparse.embedding_bags.{t}.weight": truth(t)["weight"] for t in TABLES}
    full["dense.weight"] = torch.arange(6.0).view(2, 3)
    full["dense.bias"] = torch.full((2,), 7.0)
    load_sharded_state_dict(model, full)
    out = local_view(model)
    # Weights came from the plain dict; the optimizer state was not in it and stays zero.
    for shards in out.values():
        for _, _, s in shards:
            assert not s.any()
    return {t: [(o, w) for o, w, _ in shards] for t, shards in out.items()}


def test_unsharded_state_dict_loads_into_sharded_model(dist_pool: Any) -> None:
    for res in dist_pool.run(3, case_load_unsharded_sd, plan={"t0": "rw", "t1": "cw", "t2": "tw"}):
        for table, shards in res.items():
            for (r0, c0), w in shards:
                ref = truth(table)["weight"][r0 : r0 + w.shape[0], c0 : c0 + w.shape[1]]
                assert torch.equal(w, ref)


def case_state_dict_keys(env: ShardingEnv, plan: dict[str, str]) -> dict[str, Any]:
    sd = sharded_state_dict(sharded_model(plan, env, "truth"), env.pg)
    return {
        section: {k: (type(v).__name__, tuple(v.size())) for k, v in part.items()}
        for section, part in sd.items()
    }


def test_state_dict_has_unsharded_keys_on_every_rank(dist_pool: Any) -> None:
    res = dist_pool.run(3, case_state_dict_keys, plan={"t0": "tw", "t1": "dp", "t2": "rw"})
    assert res[0] == res[1] == res[2]
    model = res[0]["model"]
    assert model["sparse.embedding_bags.t0.weight"] == ("ShardedTensor", (7, 8))
    assert model["sparse.embedding_bags.t1.weight"] == ("Tensor", (5, 8))  # data-parallel
    assert model["sparse.embedding_bags.t2.weight"] == ("ShardedTensor", (11, 4))
    assert res[0]["optim"]["sparse.embedding_bags.t2.weight.sum"] == ("ShardedTensor", (11,))
    assert set(model) >= {"dense.weight", "dense.bias"}


def test_wrong_model_config_names_table_and_shapes_and_changes_nothing(
    dist_pool: Any, tmp_path: Path
) -> None:
    # Saved: t0 (7, 8), t1 (5, 8), t2 (11, 4). Load into a model of the same tables: fine.
    root = str(tmp_path / "ck")
    dist_pool.run(2, case_save, root=root, plan=SAVE_PLAN, step=1)
    msgs = dist_pool.run(2, case_mismatch_wrapper, root=root)
    for msg in msgs:
        assert "'t2'" in msg
        assert "(11, 4)" in msg
        assert "(11, 6)" in msg
        assert "'t3'" in msg
        assert "missing" in msg


def case_mismatch_wrapper(env: ShardingEnv, root: str) -> str:
    """A model whose t2 is 11 x 6 (not 11 x 4) and with an extra table t3 the checkpoint lacks."""
    global TABLES
    saved = dict(TABLES)
    TABLES = {"t0": (7, 8), "t1": (5, 8), "t2": (11, 6), "t3": (3, 2)}
    try:
        model = sharded_model({"t0": "rw", "t1": "tw", "t2": "cw", "t3": "tw"}, env, "truth")
        sparse = model.sparse
        assert isinstance(sparse, StandInShardedEBC)
        before = {
            t: [w.tensor.clone() for w in ts.weight]
            for t, ts in sparse.local_table_shards().items()
        }
        dense_before = model.dense.weight.detach().clone()
        try:
            load(root, model, pg=env.pg)
        except CheckpointError as exc:
            for t, ts in sparse.local_table_shards().items():
                for a, b in zip(before[t], ts.weight, strict=True):
                    assert torch.equal(a, b.tensor), f"{t} changed before the error"
            assert torch.equal(dense_before, model.dense.weight.detach())
            return str(exc)
        raise AssertionError("loading a checkpoint of another model config did not fail")
    finally:
        TABLES = saved
