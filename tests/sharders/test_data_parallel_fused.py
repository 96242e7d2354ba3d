"""Data-parallel tables trained by a fused optimizer, against the unsharded module.

Every rank holds a replica; after backward the ranks sum each table's gradient and touched rows
(one all-reduce) and apply the fused optimizer to the rows any rank touched. ``check_sharding``
compares each case with the unsharded module on the concatenation of every rank's batch (outputs,
gradients, every replica and optimizer state); ``case_replicas`` trains the same case again to see
what the kit does not: the gradient handed to the fused update, replicas equal to the bit, and rows
nobody read left alone. Losses are sums over samples, so a row's gradient is the sum over the
ranks; DDP averages the dense head's gradient, so that case's dense optimizer uses
``lr * world_size``.

Table ``t0``'s ids are laid out by hand: row 1 is read only on rank 0, row 2 on every rank, row 3
only on the last rank, row 4 only at step 1 on rank 0, and rows 0, 5 and 6 never.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
)
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.sharding_plan import data_parallel, row_wise
from shardrec.kernels import TableBatchedEmbedding
from shardrec.testing import EmbeddingModel, GlobalBatch, WorkerPool, check_sharding

from ._tables import SEQUENCE_DIM, table_model

pytestmark = pytest.mark.multiprocess

TABLES = [("t0", 7, 4, ["f0"]), ("t1", 5, 8, ["f1", "f2"])]
KEYS = ["f2", "f0", "f1"]  # not the module's order
EC_DIM = SEQUENCE_DIM
STEPS = 3
LR = 0.05
SEED = 7
OPTIMIZERS = ["sgd", "exact_adagrad", "rowwise_adagrad", "adam"]
NEVER_READ = [0, 5, 6]  # rows of t0 no rank reads


def model(kind: str, optimizer: str | None, weighted: bool = False) -> EmbeddingModel:
    """Every table data-parallel-able; ``optimizer`` None: plain tables, trained through DDP."""
    fused = None if optimizer is None else {"optimizer": optimizer, "learning_rate": LR}
    return table_model(TABLES, kind, fused, weighted=weighted)


def t0_bags(step: int, rank: int, world: int) -> list[list[int]]:
    first = [2, 1] if rank == 0 else [2]
    second = [3] if rank == world - 1 else ([4] if step == 1 and rank == 0 else [])
    return [first, second]


def global_batch(step: int, world: int, *, weighted: bool = False) -> GlobalBatch:
    """Every rank's 2 samples: t0's ids laid out by hand (see above), t1's random."""
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
    g = torch.Generator().manual_seed(900 + step)
    wts = [torch.rand(t.numel(), generator=g) + 0.5 for t in ids] if weighted else None
    return GlobalBatch(KEYS, lengths, ids, wts, sizes)


def dp_plan(kind: str, world: int) -> dict[str, ParameterSharding]:
    return {n: data_parallel(r, d if kind == "ebc" else EC_DIM, world) for n, r, d, _ in TABLES}


def lookup_of(dmp: DistributedModelParallel) -> TableBatchedEmbedding:
    lookup = dmp.module.get_submodule("emb.lookup")
    assert isinstance(lookup, TableBatchedEmbedding)
    return lookup


def case_replicas(env: ShardingEnv, kind: str, optimizer: str | None, weighted: bool) -> Any:
    """What ``check_sharding`` does not see: the gradient the fused update gets (recorded at
    each step), and each rank's whole replica and optimizer state after the steps."""
    world = env.world_size
    dmp = DistributedModelParallel(
        model(kind, optimizer, weighted).build(SEED),
        env=env,
        plan=ShardingPlan({"emb": dp_plan(kind, world)}),
    )
    lookup = lookup_of(dmp)
    table_grads: list[dict[str, torch.Tensor]] = []
    if optimizer is not None:
        apply_update = lookup.apply_update

        def recording(grads: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor]) -> None:
            table_grads.append({n: g.clone() for n, g in grads.items()})
            apply_update(grads, rows)

        lookup.apply_update = recording  # type: ignore[method-assign]
    # DDP averages the head's gradient; the losses are sums over samples.
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR * world)
    for step in range(STEPS):
        _, loss = dmp(global_batch(step, world, weighted=weighted).kjt(env.rank))
        loss.backward()
        if optimizer is not None:
            # The fused update ran in backward; DDP and torch optimizers never see the tables.
            assert not any(p.requires_grad for p in lookup.weights.values())
        opt.step()
        opt.zero_grad()
    shards = dmp.local_table_shards()["emb"]
    return {
        "table_grads": table_grads,
        "weights": {t: s.weight[0].tensor.clone() for t, s in shards.items()},
        "states": {
            t: {n: v[0].tensor.clone() for n, v in s.optimizer_state.items()}
            for t, s in shards.items()
        },
        "replicated": [s.replicated and len(s.weight) == 1 for s in shards.values()],
    }


def check(
    pool: WorkerPool,
    world: int,
    *,
    optimizer: str | None,
    kind: str = "ebc",
    weighted: bool = False,
) -> None:
    # Outputs, dense (and per-id weights') gradients at each step, every replica and optimizer
    # state after the steps (and, plain, the tables' gradients), against the unsharded module.
    check_sharding(
        model(kind, optimizer, weighted),
        plan=functools.partial(dp_plan, kind),
        world_size=world,
        steps=STEPS,
        batches=functools.partial(global_batch, weighted=weighted),
        pool=pool,
    )
    results = pool.run(world, case_replicas, kind=kind, optimizer=optimizer, weighted=weighted)
    first = results[0]
    # The fused update's gradient at step 0: the unsharded module's, summed over every rank.
    plain = model(kind, None, weighted).build(SEED)
    plain(global_batch(0, world, weighted=weighted).kjt(None))[1].backward()
    plain_lookup = plain.emb.lookup
    assert isinstance(plain_lookup, TableBatchedEmbedding)
    grad0 = {n: p.grad for n, p in plain_lookup.named_table_parameters()}
    for r, result in enumerate(results):
        assert all(result["replicated"]), f"rank {r}: a table is not one whole replica"
        for table, weight in first["weights"].items():
            msg = f"table {table}, rank {r}"
            # Replicas never drift: every rank holds the same bits.
            assert torch.equal(result["weights"][table], weight), msg
            assert result["states"][table].keys() == first["states"][table].keys(), msg
            for name, state in first["states"][table].items():
                assert torch.equal(result["states"][table][name], state), f"{msg}, state {name}"
            if optimizer is not None:
                grad = result["table_grads"][0][table]
                torch.testing.assert_close(grad, grad0[table], atol=1e-5, rtol=1e-5, msg=msg)
    # Rows nobody read keep their initial weights and an empty optimizer state.
    initial = model(kind, optimizer, weighted).build(SEED).emb.lookup
    assert isinstance(initial, TableBatchedEmbedding)
    t0, t0_initial = first["weights"]["t0"], initial.table_weights()["t0"]
    assert torch.equal(t0[NEVER_READ], t0_initial[NEVER_READ])
    assert not torch.equal(t0[[1, 2, 3, 4]], t0_initial[[1, 2, 3, 4]])
    for name, state in first["states"]["t0"].items():
        if state.dim() > 0:
            assert float(state[NEVER_READ].abs().sum()) == 0.0, name


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("world", [2, 3])
def test_fused_data_parallel_matches_unsharded(
    dist_pool: WorkerPool, world: int, optimizer: str, weighted: bool
) -> None:
    check(dist_pool, world, optimizer=optimizer, weighted=weighted)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_fused_data_parallel_embedding_collection(dist_pool: WorkerPool, optimizer: str) -> None:
    check(dist_pool, 3, kind="ec", optimizer=optimizer)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_fused_data_parallel_beside_other_shardings_with_an_empty_rank(
    dist_pool: WorkerPool, kind: str, optimizer: str
) -> None:
    # test_equivalence's tables, through check_sharding, with a rank that has no samples at all.
    # (No column-wise table: row-wise Adagrad keeps one state per row of each column shard.)
    from .test_equivalence import model as equivalence_model
    from .test_equivalence import plan_of

    def how(i: int, world: int) -> Any:
        return [("tw", [2]), "dp", "rw", "dp"][i]

    check_sharding(
        equivalence_model(kind, optimizer=optimizer),
        plan=plan_of(how, kind),
        world_size=3,
        empty_rank=1,
        pool=dist_pool,
    )


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_without_fused_optimizer_trains_through_ddp(
    dist_pool: WorkerPool, world: int
) -> None:
    check(dist_pool, world, optimizer=None)


# ---- checkpoints -----------------------------------------------------------------------------


def snapshot(lookup: TableBatchedEmbedding) -> dict[str, torch.Tensor]:
    out = {f"{t}.weight": w.clone() for t, w in lookup.table_weights().items()}
    for t, states in lookup.optimizer_states().items():
        out.update({f"{t}.{n}": v.clone() for n, v in states.items()})
    return out


def case_save(env: ShardingEnv, root: str, optimizer: str) -> dict[str, torch.Tensor]:
    world = env.world_size
    dmp = DistributedModelParallel(
        model("ebc", optimizer).build(SEED),
        env=env,
        plan=ShardingPlan({"emb": dp_plan("ebc", world)}),
    )
    for step in range(2):
        dmp(global_batch(step, world).kjt(env.rank))[1].backward()
    save(root, dmp, step=2, pg=env.pg)
    return snapshot(lookup_of(dmp))


def case_load(
    env: ShardingEnv, root: str, optimizer: str, how: str
) -> list[tuple[str, int, torch.Tensor]]:
    """Every shard this rank holds after loading: (name, first row, tensor)."""
    world = env.world_size
    plan = dp_plan("ebc", world)
    if how == "rw":
        plan = {n: row_wise(r, d, world) for n, r, d, _ in TABLES}
    # Other initial numbers than the saved model's.
    dmp = DistributedModelParallel(
        model("ebc", optimizer).build(99), env=env, plan=ShardingPlan({"emb": plan})
    )
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
    dist_pool: WorkerPool, tmp_path: Path, optimizer: str
) -> None:
    # Exact: what was saved is what loads (check_sharding's round trip compares with the
    # unsharded module, within a tolerance).
    root = str(tmp_path / "ck")
    saved = dist_pool.run(2, case_save, root=root, optimizer=optimizer)
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key
    truth = saved[0]

    # Into the unsharded module: the replicas were saved as one table each.
    unsharded = model("ebc", optimizer).build(99)
    assert load(root, unsharded) == 2
    lookup = unsharded.emb.lookup
    assert isinstance(lookup, TableBatchedEmbedding)
    got = snapshot(lookup)
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
    unsharded = model("ebc", "adam").build(100 + env.rank)
    lookup = unsharded.emb.lookup
    assert isinstance(lookup, TableBatchedEmbedding)
    before = {t: w.clone() for t, w in lookup.table_weights().items()}
    dmp = DistributedModelParallel(
        unsharded, env=env, plan=ShardingPlan({"emb": dp_plan("ebc", env.world_size)})
    )
    after = {t: s.weight[0].tensor.clone() for t, s in dmp.local_table_shards()["emb"].items()}
    return {**{f"before.{t}": w for t, w in before.items()}, **after}


def test_replicas_start_as_rank_zeros_tables(dist_pool: WorkerPool) -> None:
    results = dist_pool.run(3, case_built_apart)
    for table, *_ in TABLES:
        assert not torch.equal(results[1][f"before.{table}"], results[0][f"before.{table}"])
        for r, result in enumerate(results):
            assert torch.equal(result[table], results[0][f"before.{table}"]), (table, r)
