"""Managed-collision modules under DistributedModelParallel, against the unsharded module.

Each rank trains on its slice of a global batch of raw int64 ids drawn from a population larger
than the tables (so rows are admitted, evicted and reset every step); the unsharded module trains
here on the whole global batch. After every step the sharded run must give each rank the
unsharded module's output rows and (scaled from DDP's average) dense gradient, and at the end the
same id-to-row maps, counters and table weights, under every sharding type, mixes of them, on
tables whose rows divide by no world size, at 2 and 3 processes, with tables of one bucket and
tables split into a number of buckets that is not the world size (each rank then holds only its
buckets' maps). A checkpoint taken at one world size resumes at another under another plan where
the unsharded run goes on.
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
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardedEmbeddingModule,
    ShardingEnv,
    ShardingPlan,
)
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise
from shardrec.modules import BadBatchError
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_admission import CountThresholdAdmission
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from shardrec.modules.mc_policies import LFU_EvictionPolicy, LRU_EvictionPolicy
from shardrec.testing import GlobalBatch
from shardrec_sharders.managed_buckets import ShardedManagedCollisionCollection
from shardrec_sharders.managed_collision import ShardedManagedCollisionEmbeddings

pytestmark = pytest.mark.multiprocess

TABLES = [("t0", 13, 8, ["f0", "f1"]), ("t1", 7, 6, ["f2"])]  # rows divide by neither 2 nor 3
KEYS = ["f0", "f1", "f2"]
TOTAL = 7  # samples per global batch: 4 + 3 at two ranks, 3 + 2 + 2 at three
STEPS = 4
EC_DIM = 4  # an EmbeddingCollection's tables share one dimension
POOL = torch.tensor([9_137_702_141, -42, 2**62, 7, -(2**40), 3, 11, *range(100, 125)])
# t0's 12 rows for ids in 5 buckets of 3, 3, 2, 2, 2; t1's 6 in 4 of 2, 2, 1, 1.
SPLIT: dict[str, int] = {"t0": 5, "t1": 4}
Buckets = int | dict[str, int]
TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}
Block = tuple[torch.Tensor, tuple[int, int]]


class Model(nn.Module):
    def __init__(self, mc: nn.Module, width: int) -> None:
        super().__init__()
        self.mc = mc
        self.dense = nn.Linear(width, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.mc(kjt)
        if isinstance(out, dict):  # an EmbeddingCollection: each feature's ids' rows in turn
            rows = torch.cat([out[k].values() for k in sorted(out)])
        else:
            rows = out.values()
        return rows, self.dense(torch.tanh(rows)).sum()


def build(optimizer: str, sequence: bool = False, buckets: Buckets = 1) -> Model:
    torch.manual_seed(3)
    ec_configs = [
        EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=EC_DIM, feature_names=f)
        for n, r, _, f in TABLES
    ]
    ebc_configs = [
        EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f)
        for n, r, d, f in TABLES
    ]
    configs = ec_configs if sequence else ebc_configs
    mcc = ManagedCollisionCollection(
        {
            "t0": MCHManagedCollisionModule(13, eviction_policy=LRU_EvictionPolicy(), name="t0"),
            "t1": MCHManagedCollisionModule(
                7,
                eviction_policy=LFU_EvictionPolicy(),
                eviction_interval=2,
                admission=CountThresholdAdmission(threshold=2),
                name="t1",
            ),
        },
        configs,
        num_buckets=buckets,
    )
    fused = {"optimizer": optimizer, "learning_rate": 0.1}
    if sequence:
        ec = EmbeddingCollection(ec_configs, fused_params=fused)
        return Model(ManagedCollisionEmbeddingCollection(ec, mcc, seed=5), width=EC_DIM)
    ebc = EmbeddingBagCollection(ebc_configs, fused_params=fused)
    return Model(ManagedCollisionEmbeddingBagCollection(ebc, mcc, seed=5), width=22)


def sizes(world: int) -> list[int]:
    base, extra = divmod(TOTAL, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def global_batch(step: int, world: int) -> GlobalBatch:
    """Step ``step``'s samples (the same at any world size), cut into ``world`` ranks' parts.
    Raw ids: far above the tables' rows, so never checked against them."""
    g = torch.Generator().manual_seed(900 + step)
    lengths = torch.randint(0, 4, (len(KEYS), TOTAL), generator=g)
    ids = [POOL[torch.randint(0, len(POOL), (int(n),), generator=g)] for n in lengths.sum(1)]
    return GlobalBatch(KEYS, lengths, ids, None, sizes(world))


def batch(step: int, world: int, rank: int | None) -> KeyedJaggedTensor:
    return global_batch(step, world).kjt(rank)


def rows_by_rank(rows: torch.Tensor, whole: GlobalBatch, sequence: bool) -> list[torch.Tensor]:
    """The unsharded module's output ``rows`` for the whole batch, cut into each rank's part: a
    row per sample (EBC), or each rank's ids of every feature's block, features sorted (EC)."""
    return whole.rows_by_rank(rows, sorted(whole.keys) if sequence else None)


def assemble(like: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
    """A tensor shaped like ``like`` from blocks at their ``(row, col)``; NaN where none lies."""
    out = torch.full_like(like, float("nan"))
    for tensor, (row, col) in blocks:
        out[row : row + tensor.shape[0], col : col + tensor.shape[1]] = tensor
    return out


def plan_of(kind: str, world: int, sequence: bool = False) -> ShardingPlan:
    def one(name: str, rows: int, dim: int, i: int) -> ParameterSharding:
        dim = EC_DIM if sequence else dim
        chosen = kind if kind != "mixed" else ("row_wise", "data_parallel")[i]
        if chosen == "table_wise":
            return table_wise((i + 1) % world, rows, dim)
        if chosen == "row_wise":
            return row_wise(rows, dim, world)
        if chosen == "column_wise":
            return column_wise(rows, dim, [(i + r) % world for r in range(2)])
        return data_parallel(rows, dim, world)

    return ShardingPlan({"mc": {n: one(n, r, d, i) for i, (n, r, d, _) in enumerate(TABLES)}})


def snapshot(mc: Any) -> dict[str, Any]:
    """The id-to-row maps (sharded: of this rank's buckets only) and the counters."""
    return {"maps": mc.managed_collision_collection.held_ids(), "stats": mc.stats()}


def train_sharded(
    model: DistributedModelParallel, env: ShardingEnv, steps: range
) -> dict[str, Any]:
    outputs, grads = [], []
    for step in steps:
        model.zero_grad()
        rows, loss = model(batch(step, env.world_size, env.rank))
        loss.backward()
        outputs.append(rows.detach().clone())
        dense = model.module.dense
        assert isinstance(dense, nn.Linear)
        assert dense.weight.grad is not None
        grads.append(dense.weight.grad.clone() * env.world_size)  # DDP averages
    # An eval-mode lookup after training: every id travels to its bucket's owner, nothing changes.
    model.eval()
    with torch.no_grad():
        evaluated = model(batch(steps.stop, env.world_size, env.rank))[0].clone()
    model.train()
    return {"outputs": outputs, "dense_grads": grads, "eval": evaluated}


def _block(state: torch.Tensor, offsets: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]]:
    """An Adagrad sum as a 2-D block: row-wise sums (1-D) as one column."""
    if state.dim() == 1:
        return state.detach().clone().view(-1, 1), (offsets[0], 0)
    return state.detach().clone(), (offsets[0], offsets[1])


def finish(model: DistributedModelParallel, result: dict[str, Any]) -> dict[str, Any]:
    mc = model.module.mc
    assert isinstance(mc, ShardedManagedCollisionEmbeddings)
    inner = mc.embedding_module
    assert isinstance(inner, ShardedEmbeddingModule)
    held = inner.local_table_shards()
    result["shards"] = {
        t: [(s.tensor.detach().clone(), s.offsets) for s in ts.weight] for t, ts in held.items()
    }
    result["sums"] = {
        t: [_block(s.tensor, s.offsets) for s in ts.optimizer_state.get("sum", [])]
        for t, ts in held.items()
    }
    result.update(snapshot(mc))
    buckets = mc.managed_collision_collection.held_buckets()
    result["held"] = {t: sorted(b) for t, b in buckets.items()}
    return result


def case_train(
    env: ShardingEnv, kind: str, optimizer: str, sequence: bool = False, buckets: Buckets = 1
) -> dict[str, Any]:
    plan = plan_of(kind, env.world_size, sequence)
    model = DistributedModelParallel(build(optimizer, sequence, buckets), env=env, plan=plan)
    return finish(model, train_sharded(model, env, range(STEPS)))


def reference(
    optimizer: str,
    steps: int,
    world_of_step: list[int],
    sequence: bool = False,
    buckets: Buckets = 1,
) -> dict[str, Any]:
    model = build(optimizer, sequence, buckets)
    outputs, grads = [], []
    for step in range(steps):
        model.zero_grad()
        whole = global_batch(step, world_of_step[step])
        rows, loss = model(whole.kjt())
        loss.backward()
        outputs.append(rows_by_rank(rows.detach(), whole, sequence))
        assert model.dense.weight.grad is not None
        grads.append(model.dense.weight.grad.clone())
    model.eval()
    with torch.no_grad():
        whole = global_batch(steps, world_of_step[-1])
        evaluated = rows_by_rank(model(whole.kjt())[0], whole, sequence)
    model.train()
    mc = model.mc
    assert isinstance(
        mc, ManagedCollisionEmbeddingBagCollection | ManagedCollisionEmbeddingCollection
    )
    weights = mc.embedding_module.lookup.table_weights()
    states = mc.embedding_module.lookup.optimizer_states()
    return {
        "outputs": outputs,
        "dense_grads": grads,
        "eval": evaluated,
        "weights": {t: w.detach().clone() for t, w in weights.items()},
        "sums": {t: _block(s["sum"], (0, 0))[0] for t, s in states.items()},
        **snapshot(mc),
        "layouts": mc.managed_collision_collection.bucket_layouts(),
    }


def check(results: list[dict[str, Any]], ref: dict[str, Any], first_step: int = 0) -> None:
    for table, layout in ref["layouts"].items():
        # Every bucket on exactly one rank, and its map there only.
        owners = sorted(b for res in results for b in res["held"][table])
        assert owners == list(range(layout.num_buckets)), f"{table}: buckets held {owners}"
        merged: dict[int, int] = {}
        for res in results:
            assert not set(merged) & set(res["maps"][table]), f"{table}: an id on two ranks"
            merged.update(res["maps"][table])
        assert merged == ref["maps"][table], f"{table}: id-to-row maps differ"
    for r, res in enumerate(results):
        assert res["stats"] == ref["stats"], f"rank {r}: counters differ"
        torch.testing.assert_close(res["eval"], ref["eval"][r], **TOL)
        for i, out in enumerate(res["outputs"]):
            torch.testing.assert_close(out, ref["outputs"][first_step + i][r], **TOL)
            torch.testing.assert_close(
                res["dense_grads"][i], ref["dense_grads"][first_step + i], **TOL
            )
    for key in ("weights", "sums"):
        for table, full in ref[key].items():
            part = "shards" if key == "weights" else "sums"
            rebuilt = assemble(full, [b for res in results for b in res[part][table]])
            torch.testing.assert_close(rebuilt, full, **TOL, msg=f"{key} of {table}")


# Column slices keep row-wise Adagrad's mean of g^2 over their own columns (so does every
# column-wise table): the column-wise cases train with exact Adagrad, whose state is per element.
# ``SPLIT`` gives each table a number of buckets that is not the world size (5 and 4 buckets over
# 2 or 3 ranks); 1 keeps each table in one bucket (on one rank).
@pytest.mark.parametrize(
    ("world", "kind", "optimizer", "buckets"),
    [
        (2, "table_wise", "rowwise_adagrad", 1),
        (3, "table_wise", "rowwise_adagrad", SPLIT),
        (2, "row_wise", "rowwise_adagrad", SPLIT),
        (3, "row_wise", "exact_adagrad", 1),
        (3, "row_wise", "rowwise_adagrad", SPLIT),
        (2, "column_wise", "exact_adagrad", 1),
        (3, "column_wise", "exact_adagrad", SPLIT),
        (2, "data_parallel", "rowwise_adagrad", SPLIT),
        (3, "data_parallel", "rowwise_adagrad", 1),
        (3, "mixed", "rowwise_adagrad", SPLIT),
    ],
)
def test_sharded_managed_module_equals_the_unsharded_one(
    dist_pool: Any, world: int, kind: str, optimizer: str, buckets: Buckets
) -> None:
    ref = reference(optimizer, STEPS, [world] * STEPS, buckets=buckets)
    assert ref["stats"]["t0"].evicted_total > 0  # the stream exercises eviction and admission
    assert ref["stats"]["t1"].admitted_total > 0
    check(dist_pool.run(world, case_train, kind=kind, optimizer=optimizer, buckets=buckets), ref)


@pytest.mark.parametrize(("world", "kind", "buckets"), [(2, "row_wise", 1), (3, "mixed", SPLIT)])
def test_sharded_managed_embedding_collection_equals_the_unsharded_one(
    dist_pool: Any, world: int, kind: str, buckets: Buckets
) -> None:
    ref = reference("rowwise_adagrad", STEPS, [world] * STEPS, sequence=True, buckets=buckets)
    results = dist_pool.run(
        world, case_train, kind=kind, optimizer="rowwise_adagrad", sequence=True, buckets=buckets
    )
    check(results, ref)


def case_save(env: ShardingEnv, root: str, kind: str, buckets: Buckets) -> None:
    model = DistributedModelParallel(
        build("rowwise_adagrad", buckets=buckets), env=env, plan=plan_of(kind, env.world_size)
    )
    train_sharded(model, env, range(2))
    save(root, model, step=2, pg=env.pg)


def case_resume(env: ShardingEnv, root: str, kind: str, buckets: Buckets) -> dict[str, Any]:
    model = DistributedModelParallel(
        build("rowwise_adagrad", buckets=buckets), env=env, plan=plan_of(kind, env.world_size)
    )
    assert load(root, model, pg=env.pg) == 2
    return finish(model, train_sharded(model, env, range(2, STEPS)))


@pytest.mark.parametrize(
    ("saved", "resumed", "buckets"),
    [((2, "row_wise"), (3, "mixed"), 1), ((3, "mixed"), (2, "table_wise"), SPLIT)],
)
def test_checkpoint_resumes_at_another_world_size_under_another_plan(
    dist_pool: Any,
    tmp_path: Path,
    saved: tuple[int, str],
    resumed: tuple[int, str],
    buckets: Buckets,
) -> None:
    root = str(tmp_path / "ck")
    dist_pool.run(saved[0], case_save, root=root, kind=saved[1], buckets=buckets)
    ref = reference("rowwise_adagrad", STEPS, [saved[0]] * 2 + [resumed[0]] * 2, buckets=buckets)
    results = dist_pool.run(resumed[0], case_resume, root=root, kind=resumed[1], buckets=buckets)
    check(results, ref, first_step=2)
    # The same checkpoint loads into the unsharded module: maps, counters and tables.
    unsharded = build("rowwise_adagrad", buckets=buckets)
    assert load(root, unsharded) == 2
    at_two = reference("rowwise_adagrad", 2, [saved[0]] * 2, buckets=buckets)
    assert isinstance(unsharded.mc, ManagedCollisionEmbeddingBagCollection)
    assert snapshot(unsharded.mc) == {k: at_two[k] for k in ("maps", "stats")}
    for table, weight in unsharded.mc.embedding_module.lookup.table_weights().items():
        torch.testing.assert_close(weight, at_two["weights"][table], **TOL)


@pytest.mark.parametrize("buckets", [1, SPLIT])
def test_an_unsharded_checkpoint_loads_sharded(
    dist_pool: Any, tmp_path: Path, buckets: Buckets
) -> None:
    # Plain tensors under every key: also what a checkpoint of the replicated maps held.
    unsharded = build("rowwise_adagrad", buckets=buckets)
    for step in range(2):
        unsharded(batch(step, 1, None))[1].backward()
    root = str(tmp_path / "ck")
    save(root, unsharded, step=2)
    ref = reference("rowwise_adagrad", STEPS, [3] * STEPS, buckets=buckets)
    results = dist_pool.run(3, case_resume, root=root, kind="mixed", buckets=buckets)
    check(results, ref, first_step=2)


def case_load_state_dict(env: ShardingEnv) -> dict[str, Any]:
    trained = build("sgd", buckets=SPLIT)
    for step in range(STEPS):  # the unsharded module, the same on every rank
        trained(batch(step, 1, None))
    assert isinstance(trained.mc, ManagedCollisionEmbeddingBagCollection)
    full = trained.mc.managed_collision_collection

    def fresh() -> ShardedManagedCollisionCollection:
        module = build("sgd", buckets=SPLIT).mc
        assert isinstance(module, ManagedCollisionEmbeddingBagCollection)
        collection = module.managed_collision_collection
        return ShardedManagedCollisionCollection(
            collection, env.rank, env.world_size, env.pg, torch.device("cpu")
        )

    # torch's load_state_dict, from the unsharded module's plain tensors and from a sharded
    # module's ShardedTensors: each rank takes its buckets, and every bucket's counters.
    from_plain = fresh()
    from_plain.load_state_dict(full.state_dict())
    from_sharded = fresh()
    from_sharded.load_state_dict(from_plain.state_dict())
    return {
        "maps": [m.held_ids() for m in (from_plain, from_sharded)],
        "stats": [m.stats() for m in (from_plain, from_sharded)],
        "held": {t: sorted(b) for t, b in from_plain.held_buckets().items()},
        "expected_stats": full.stats(),
        "expected_maps": full.held_ids(),
    }


def test_load_state_dict_takes_each_ranks_buckets(dist_pool: Any) -> None:
    results = dist_pool.run(3, case_load_state_dict)
    expected = results[0]["expected_maps"]
    for copy in range(2):
        for table, wanted in expected.items():
            merged: dict[int, int] = {}
            for res in results:
                merged.update(res["maps"][copy][table])
            assert merged == wanted, f"{table}: maps differ (copy {copy})"
        for res in results:
            assert res["stats"][copy] == res["expected_stats"]
    assert sum(len(res["held"]["t0"]) for res in results) == SPLIT["t0"]
    assert results[0]["expected_stats"]["t0"].evicted_total > 0


def case_bad_batch(env: ShardingEnv) -> str:
    model = DistributedModelParallel(
        build("sgd"), env=env, plan=plan_of("row_wise", env.world_size)
    )
    kjt = batch(0, env.world_size, env.rank)
    if env.rank == 1:
        kjt = KeyedJaggedTensor(keys=KEYS, values=kjt.values().float(), lengths=kjt.lengths())
    with pytest.raises(BadBatchError) as caught:
        model(kjt)
    assert caught.value.ranks == (1,)
    return str(caught.value)


def test_a_refused_batch_raises_on_every_rank(dist_pool: Any) -> None:
    messages = dist_pool.run(3, case_bad_batch)
    assert "rank 1: managed ids must be int64 or int32" in messages[1]
    for other in (0, 2):
        assert "rank(s) [1]" in messages[other]
