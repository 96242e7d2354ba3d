"""Data-parallel tables trained by a fused optimizer, against the unsharded module.

Every rank holds a replica; after backward the ranks sum each table's gradient and touched rows
(one all-reduce) and apply the fused optimizer to the rows any rank touched. The unsharded module
runs here on the concatenation of every rank's batch. Losses are sums over samples, so a row's
gradient is the sum over the ranks; DDP averages the dense head's gradient, so the sharded run's
dense optimizer uses ``lr * world_size``.

Table ``t0``'s ids are laid out by hand: row 1 is read only on rank 0, row 2 on every rank, row 3
only on the last rank, row 4 only at step 1 on rank 0, and rows 0, 5 and 6 never.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.sharding_plan import data_parallel, row_wise
from shardrec.testing import check_sharding

from ._reference import (
    TOL,
    Model,
    assert_dense_grads_match,
    assert_outputs_match,
    build_model,
    rank_kjt,
    rows_per_rank,
)

pytestmark = pytest.mark.multiprocess

TABLES = [("t0", 7, 4, ["f0"]), ("t1", 5, 8, ["f1", "f2"])]
KEYS = ["f2", "f0", "f1"]  # not the module's order
STEPS = 3
LR = 0.05
OPTIMIZERS = ["sgd", "exact_adagrad", "rowwise_adagrad", "adam"]
NEVER_READ = [0, 5, 6]  # rows of t0 no rank reads


def t0_bags(step: int, rank: int, world: int) -> list[list[int]]:
    first = [2, 1] if rank == 0 else [2]
    second = [3] if rank == world - 1 else ([4] if step == 1 and rank == 0 else [])
    return [first, second]


def global_batch(step: int, world: int) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Per-feature lengths ``[F, total]`` and ids of the global batch; 2 samples per rank."""
    g = torch.Generator().manual_seed(500 + step)
    sizes = [2] * world
    bags: dict[str, list[list[int]]] = {"f0": []}
    for r in range(world):
        bags["f0"] += t0_bags(step, r, world)
    for f in ("f1", "f2"):
        bags[f] = [
            torch.randint(0, 4, (int(n),), generator=g).tolist()  # row 4 of t1: never read
            for n in torch.randint(0, 4, (sum(sizes),), generator=g)
        ]
    lengths = torch.tensor([[len(b) for b in bags[k]] for k in KEYS])
    ids = [torch.tensor([i for b in bags[k] for i in b], dtype=torch.int64) for k in KEYS]
    return lengths, ids, sizes


def make_batch(step: int, world: int, rank: int | None, weighted: bool) -> KeyedJaggedTensor:
    lengths, ids, sizes = global_batch(step, world)
    g = torch.Generator().manual_seed(900 + step)
    wts = [torch.rand(t.numel(), generator=g) + 0.5 for t in ids] if weighted else None
    return rank_kjt(KEYS, lengths, ids, wts, sizes, rank)


def build(kw: dict[str, Any], fused: bool = True) -> Model:
    opt = kw["optimizer"]
    params = {"optimizer": opt, "learning_rate": LR} if fused and opt is not None else None
    return build_model(
        kw["kind"], TABLES, seed=7, fused=params, weighted=kw["weighted"], squash=True
    )


def dp_plan(kind: str, world: int) -> ShardingPlan:
    return ShardingPlan(
        {"emb": {n: data_parallel(r, d if kind == "ebc" else 4, world) for n, r, d, _ in TABLES}}
    )


def case_train(env: ShardingEnv, **kw: Any) -> dict[str, Any]:
    world, rank = env.world_size, env.rank
    model = build(kw)
    dmp = DistributedModelParallel(model, env=env, plan=dp_plan(kw["kind"], world))
    replica = dmp.module.emb
    table_grads: list[dict[str, torch.Tensor]] = []
    if kw["optimizer"] is not None:
        apply_update = replica.lookup.apply_update

        def recording(grads: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> None:
            table_grads.append({n: g.clone() for n, g in grads.items()})
            apply_update(grads, rows)

        replica.lookup.apply_update = recording
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR * world)
    outputs, dense_grads = [], []
    for step in range(STEPS):
        rows, loss = dmp(make_batch(step, world, rank, kw["weighted"]))
        loss.backward()
        if kw["optimizer"] is not None:
            # The fused update ran in backward; DDP and torch optimizers never see the tables.
            assert not any(p.requires_grad for p in replica.lookup.weights.values())
        outputs.append(rows.detach().clone())
        dense_grads.append(model.dense.weight.grad.clone() * world)
        opt.step()
        opt.zero_grad()
    shards = dmp.local_table_shards()["emb"]
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "table_grads": table_grads,
        "weights": {t: s.weight[0].tensor.clone() for t, s in shards.items()},
        "states": {
            t: {n: v[0].tensor.clone() for n, v in s.optimizer_state.items()}
            for t, s in shards.items()
        },
        "replicated": [s.replicated and len(s.weight) == 1 for s in shards.values()],
    }


def reference(kw: dict[str, Any], world: int) -> dict[str, Any]:
    model = build(kw)
    outputs, dense_grads = [], []
    for step in range(STEPS):
        rows, loss = model(make_batch(step, world, None, kw["weighted"]))
        loss.backward()
        outputs.append(rows.detach())
        dense_grads.append(model.dense.weight.grad.clone())
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:  # the dense head; the tables too without a fused optimizer
                    p -= LR * p.grad
                    p.grad = None
    # The tables' gradient at step 0, from the same module without a fused optimizer.
    plain = build(kw, fused=False)
    plain(make_batch(0, world, None, kw["weighted"]))[1].backward()
    return {
        "outputs": outputs,
        "dense_grads": dense_grads,
        "weights": model.emb.lookup.table_weights(),
        "states": model.emb.lookup.optimizer_states(),
        "grad0": {n: p.grad for n, p in plain.emb.lookup.named_table_parameters()},
        "initial": build(kw).emb.lookup.table_weights(),
    }


def check(dist_pool: Any, world: int, **kw: Any) -> None:
    kw.setdefault("kind", "ebc")
    kw.setdefault("weighted", False)
    results = dist_pool.run(world, case_train, **kw)
    ref = reference(kw, world)
    sizes = [2] * world
    expected = [
        rows_per_rank(kw["kind"], rows, make_batch(s, world, None, False), sizes, TABLES)
        for s, rows in enumerate(ref["outputs"])
    ]
    assert_outputs_match(results, expected)
    assert_dense_grads_match(results, ref["dense_grads"])
    first = results[0]
    for r, result in enumerate(results):
        assert all(result["replicated"]), f"rank {r}: a table is not one whole replica"
        for table, weight in ref["weights"].items():
            msg = f"table {table}, rank {r}"
            torch.testing.assert_close(result["weights"][table], weight, **TOL, msg=msg)
            # Replicas never drift: every rank holds the same bits.
            assert torch.equal(result["weights"][table], first["weights"][table]), msg
            assert result["states"][table].keys() == ref["states"][table].keys(), msg
            for name, state in ref["states"][table].items():
                got = result["states"][table][name]
                torch.testing.assert_close(got, state, **TOL, msg=f"{msg}, state {name}")
                assert torch.equal(got, first["states"][table][name]), f"{msg}, state {name}"
            if kw["optimizer"] is not None:
                grad = result["table_grads"][0][table]
                torch.testing.assert_close(grad, ref["grad0"][table], **TOL, msg=f"{msg}, grad")
    # Rows nobody read keep their initial weights and an empty optimizer state.
    t0 = results[0]["weights"]["t0"]
    assert torch.equal(t0[NEVER_READ], ref["initial"]["t0"][NEVER_READ])
    assert not torch.equal(t0[[1, 2, 3, 4]], ref["initial"]["t0"][[1, 2, 3, 4]])
    for name, state in results[0]["states"]["t0"].items():
        if state.dim() > 0:
            assert float(state[NEVER_READ].abs().sum()) == 0.0, name


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("world", [2, 3])
def test_fused_data_parallel_matches_unsharded(
    dist_pool: Any, world: int, optimizer: str, weighted: bool
) -> None:
    check(dist_pool, world, optimizer=optimizer, weighted=weighted)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_fused_data_parallel_embedding_collection(dist_pool: Any, optimizer: str) -> None:
    check(dist_pool, 3, kind="ec", optimizer=optimizer)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_fused_data_parallel_beside_other_shardings_with_an_empty_rank(
    dist_pool: Any, kind: str, optimizer: str
) -> None:
    # test_equivalence's tables, through check_sharding, with a rank that has no samples at all.
    # (No column-wise table: row-wise Adagrad keeps one state per row of each column shard.)
    from .test_equivalence import model, plan_of

    def how(i: int, world: int) -> Any:
        return [("tw", [2]), "dp", "rw", "dp"][i]

    check_sharding(
        model(kind, optimizer=optimizer),
        plan=plan_of(how, kind),
        world_size=3,
        empty_rank=1,
        pool=dist_pool,
    )


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_without_fused_optimizer_trains_through_ddp(
    dist_pool: Any, world: int
) -> None:
    check(dist_pool, world, optimizer=None)


# ---- checkpoints -----------------------------------------------------------------------------


def ck_kw(optimizer: str) -> dict[str, Any]:
    return {"kind": "ebc", "weighted": False, "optimizer": optimizer}


def snapshot(lookup: Any) -> dict[str, torch.Tensor]:
    out = {f"{t}.weight": w.clone() for t, w in lookup.table_weights().items()}
    for t, states in lookup.optimizer_states().items():
        out.update({f"{t}.{n}": v.clone() for n, v in states.items()})
    return out


def case_save(env: ShardingEnv, root: str, optimizer: str) -> dict[str, torch.Tensor]:
    kw = ck_kw(optimizer)
    dmp = DistributedModelParallel(build(kw), env=env, plan=dp_plan("ebc", env.world_size))
    for step in range(2):
        dmp(make_batch(step, env.world_size, env.rank, False))[1].backward()
    save(root, dmp, step=2, pg=env.pg)
    return snapshot(dmp.module.emb.lookup)


def case_load(
    env: ShardingEnv, root: str, optimizer: str, how: str
) -> list[tuple[str, int, torch.Tensor]]:
    """Every shard this rank holds after loading: (name, first row, tensor)."""
    world = env.world_size
    plan = dp_plan("ebc", world)
    if how == "rw":
        plan = ShardingPlan({"emb": {n: row_wise(r, d, world) for n, r, d, _ in TABLES}})
    model = build_model("ebc", TABLES, seed=99, fused={"optimizer": optimizer, "learning_rate": LR})
    dmp = DistributedModelParallel(model, env=env, plan=plan)
    assert load(root, dmp, pg=env.pg) == 2
    out: list[tuple[str, int, torch.Tensor]] = []
    for table, shards in dmp.local_table_shards()["emb"].items():
        for shard in shards.weight:
            out.append((f"{table}.weight", shard.offsets[0], shard.tensor.clone()))
        for name, pieces in shards.optimizer_state.items():
            for shard in pieces:
                first = shard.offsets[0] if shard.offsets else 0
                out.append((f"{table}.{name}", first, shard.tensor.clone()))
    return out


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_checkpoint_round_trip_across_world_sizes(
    dist_pool: Any, tmp_path: Path, optimizer: str
) -> None:
    root = str(tmp_path / "ck")
    saved = dist_pool.run(2, case_save, root=root, optimizer=optimizer)
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key
    truth = saved[0]

    # Into the unsharded module: the replicas were saved as one table each.
    model = build_model("ebc", TABLES, seed=99, fused={"optimizer": optimizer, "learning_rate": LR})
    assert load(root, model) == 2
    got = snapshot(model.emb.lookup)
    assert got.keys() == truth.keys()
    for key, value in truth.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)

    # At world size 3: data-parallel again (every replica the saved table) and row-wise.
    for how in ("dp", "rw"):
        for rank_out in dist_pool.run(3, case_load, root=root, optimizer=optimizer, how=how):
            assert {name for name, _, _ in rank_out} == set(truth)
            for name, first, value in rank_out:
                full = truth[name]
                expected = full if full.dim() == 0 else full[first : first + value.shape[0]]
                torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=f"{how}: {name}")


def case_built_apart(env: ShardingEnv) -> dict[str, torch.Tensor]:
    # Every rank initialises its module differently (no common seed).
    model = build_model("ebc", TABLES, seed=100 + env.rank, fused={"optimizer": "adam"})
    before = {t: w.clone() for t, w in model.emb.lookup.table_weights().items()}
    dmp = DistributedModelParallel(model, env=env, plan=dp_plan("ebc", env.world_size))
    after = {t: s.weight[0].tensor.clone() for t, s in dmp.local_table_shards()["emb"].items()}
    return {**{f"before.{t}": w for t, w in before.items()}, **after}


def test_replicas_start_as_rank_zeros_tables(dist_pool: Any) -> None:
    results = dist_pool.run(3, case_built_apart)
    for table, *_ in TABLES:
        assert not torch.equal(results[1][f"before.{table}"], results[0][f"before.{table}"])
        for r, result in enumerate(results):
            assert torch.equal(result[table], results[0][f"before.{table}"]), (table, r)
