"""A variable batch per key under DistributedModelParallel, for every built-in sharding type.

On 2 gloo processes, each rank trains two copies of one model under the same plan: one on its
full user-item batch, one on the same batch with the user features deduplicated
(``deduplicate_features``). The outputs and the dense head's gradients at every step, and every
shard of every table and of the Adagrad state after the steps, must be equal (the sharded
full-batch path is itself checked against the unsharded module in test_equivalence.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor, PoolingType
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
)
from shardrec.distributed.train_pipeline import TrainPipelineSparseDist
from shardrec.distributed.types import ShardMetadata
from shardrec.sparse import deduplicate_features
from shardrec.testing import EmbeddingModel, WorkerPool

pytestmark = pytest.mark.multiprocess

WORLD, USERS, ITEMS, STEPS = 2, 3, 3, 2
TABLES = [
    EmbeddingBagConfig(
        name="t_user", num_embeddings=11, embedding_dim=4, feature_names=["user", "age"]
    ),
    EmbeddingBagConfig(
        name="t_item",
        num_embeddings=13,
        embedding_dim=6,
        feature_names=["item", "user"],
        pooling=PoolingType.MEAN,
    ),
]
MODEL = EmbeddingModel(
    tables=TABLES, fused_params={"optimizer": "rowwise_adagrad", "learning_rate": 0.1}
)
# The simulated nodes each type is planned on: two nodes of one rank, or one node of two.
LOCAL = {
    ShardingType.TABLE_ROW_WISE: 2,
    ShardingType.TABLE_COLUMN_WISE: 2,
    ShardingType.GRID_SHARD: 1,
}


def user_item_batch(rank: int, step: int) -> KeyedJaggedTensor:
    """USERS users of this rank, ITEMS items each; a user's "user" and "age" ids repeat on each
    of their samples (the user's number first, so no two users are alike)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    users = [
        [u + 4 * rank, *torch.randint(11, (int(n),), generator=g).tolist()]
        for u, n in enumerate(torch.randint(0, 3, (USERS,), generator=g))
    ]
    rows = (
        [users[u] for u in range(USERS) for _ in range(ITEMS)]
        + [[(u + rank) % 11] for u in range(USERS) for _ in range(ITEMS)]
        + [torch.randint(13, (int(n),), generator=g).tolist() for n in torch.randint(0, 3, (9,))]
    )
    return KeyedJaggedTensor(
        ["user", "age", "item"],
        torch.tensor([i for row in rows for i in row], dtype=torch.int64),
        lengths=torch.tensor([len(row) for row in rows], dtype=torch.int32),
    )


def _train(
    env: ShardingEnv,
    plan: ShardingPlan,
    vbe: bool,
    pipelined: bool,
    model: EmbeddingModel = MODEL,
    vbe_ranks: tuple[int, ...] = tuple(range(WORLD)),
) -> dict[str, Any]:
    dmp = DistributedModelParallel(model.build(7), env=env, plan=plan)
    head = dmp.module.get_submodule("dense")
    assert isinstance(head, torch.nn.Linear)
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=0.1)
    batches = [user_item_batch(env.rank, step) for step in range(STEPS)]
    if vbe and env.rank in vbe_ranks:
        batches = [deduplicate_features(kjt, ["user", "age"]) for kjt in batches]
        assert batches[0].stride_per_key() == [USERS, USERS, USERS * ITEMS]
    outputs, grads, lengths = [], [], []
    if not model.pooled:
        # Each output's lengths, from the sharded collection itself (the head sees its values).
        emb = dmp.module.get_submodule("emb")
        for kjt in batches:
            with torch.no_grad():
                out = emb(kjt)
            lengths.append({name: out[name].lengths().clone() for name in sorted(out)})
    if pipelined:
        pipeline: TrainPipelineSparseDist[KeyedJaggedTensor, torch.Tensor] = (
            TrainPipelineSparseDist(
                dmp, opt, torch.device("cpu"), forward=lambda model, kjt: model(kjt)[::-1]
            )
        )
        it = iter(batches)
        outputs = [pipeline.progress(it).detach().clone() for _ in range(STEPS)]
    else:
        for kjt in batches:
            rows, loss = dmp(kjt)
            loss.backward()
            outputs.append(rows.detach().clone())
            assert head.weight.grad is not None
            grads.append(head.weight.grad.detach().clone())
            opt.step()
            opt.zero_grad()
    shards = dmp.local_table_shards()["emb"]
    return {
        "outputs": outputs,
        "grads": grads,
        "lengths": lengths,
        "tables": {
            (table, name, i): t.tensor.detach().clone()
            for table, held in shards.items()
            for name, pieces in [("weight", held.weight), *held.optimizer_state.items()]
            for i, t in enumerate(pieces)
        },
    }


def train_both(
    env: ShardingEnv,
    plan: ShardingPlan,
    pipelined: bool = False,
    model: EmbeddingModel = MODEL,
    vbe_ranks: tuple[int, ...] = tuple(range(WORLD)),
) -> dict[str, Any]:
    """The full batch in a plain loop; its VBE form (on ``vbe_ranks``; the full batch on the
    others) in a plain loop, or pipelined."""
    return {
        "full": _train(env, plan, vbe=False, pipelined=False, model=model),
        "vbe": _train(env, plan, vbe=True, pipelined=pipelined, model=model, vbe_ranks=vbe_ranks),
    }


def boxes(kind: ShardingType, table: EmbeddingBagConfig | EmbeddingConfig) -> ParameterSharding:
    """Two shards of ``table`` on ranks 0 and 1, cut the way ``kind`` cuts (one shard on one rank
    for table-wise), as (row offset, col offset, rows, cols, rank)."""
    rows, dim = table.num_embeddings, table.embedding_dim
    half_rows, half_cols = rows // 2, dim // 2
    first = 0 if table.name == "t_user" else 1
    cuts = {
        ShardingType.TABLE_WISE: [(0, 0, rows, dim, first)],
        ShardingType.DATA_PARALLEL: [(0, 0, rows, dim, 0), (0, 0, rows, dim, 1)],
        ShardingType.ROW_WISE: [
            (0, 0, half_rows, dim, 0),
            (half_rows, 0, rows - half_rows, dim, 1),
        ],
        ShardingType.TABLE_ROW_WISE: [
            (0, 0, half_rows, dim, 0),
            (half_rows, 0, rows - half_rows, dim, 1),
        ],
    }.get(kind, [(0, 0, rows, half_cols, first), (0, half_cols, rows, dim - half_cols, 1 - first)])
    shards = tuple(ShardMetadata((r0, c0), (nr, nc), rank) for r0, c0, nr, nc, rank in cuts)
    return ParameterSharding(
        sharding_type=str(kind),
        compute_kernel="dense" if kind is ShardingType.DATA_PARALLEL else "fused",
        ranks=tuple(s.rank for s in shards),
        shards=shards,
    )


def assert_same(ranks: list[dict[str, Any]], pooled: bool = True) -> None:
    for rank, result in enumerate(ranks):
        full, vbe = result["full"], result["vbe"]
        for step in range(STEPS):
            if pooled:
                assert full["outputs"][step].shape == (USERS * ITEMS, 4 + 4 + 6 + 6)
            else:  # every sample's ids of the three features (and "user" of two tables)
                assert full["outputs"][step].shape[0] > 0
                assert vbe["lengths"][step].keys() == full["lengths"][step].keys()
                for name, lengths in full["lengths"][step].items():
                    assert lengths.shape == (USERS * ITEMS,)
                    assert torch.equal(vbe["lengths"][step][name], lengths), (rank, step, name)
            torch.testing.assert_close(vbe["outputs"][step], full["outputs"][step])
        for full_grad, vbe_grad in zip(full["grads"], vbe["grads"], strict=False):
            torch.testing.assert_close(vbe_grad, full_grad)
        assert full["tables"].keys() == vbe["tables"].keys()
        assert any(name != "weight" for _, name, _ in full["tables"])  # Adagrad state compared
        for key, tensor in full["tables"].items():
            torch.testing.assert_close(vbe["tables"][key], tensor, msg=f"rank {rank} {key}")


@pytest.mark.parametrize("sharding_type", list(ShardingType))
def test_vbe_equals_the_full_batch(dist_pool: WorkerPool, sharding_type: ShardingType) -> None:
    plan = ShardingPlan({"emb": {t.name: boxes(sharding_type, t) for t in TABLES}})
    ranks = dist_pool.run(WORLD, train_both, local_world_size=LOCAL.get(sharding_type), plan=plan)
    assert all(len(r["vbe"]["grads"]) == STEPS for r in ranks)
    assert_same(ranks)


@pytest.mark.parametrize(
    "sharding_type", [t for t in ShardingType if t is not ShardingType.DATA_PARALLEL]
)
def test_vbe_on_one_rank_beside_a_full_batch(
    dist_pool: WorkerPool, sharding_type: ShardingType
) -> None:
    # Rank 0 sends a variable batch, rank 1 its full batch, in the same steps: every owner reads
    # each sender's layout from what it sent.
    plan = ShardingPlan({"emb": {t.name: boxes(sharding_type, t) for t in TABLES}})
    ranks = dist_pool.run(
        WORLD, train_both, local_world_size=LOCAL.get(sharding_type), plan=plan, vbe_ranks=(0,)
    )
    assert_same(ranks)


def test_vbe_pipelined_equals_the_full_batch(dist_pool: WorkerPool) -> None:
    # Two types in one module: the pipeline drives a ShardedModuleGroup's input_dist and
    # compute_and_output_dist.
    plan = ShardingPlan(
        {
            "emb": {
                "t_user": boxes(ShardingType.ROW_WISE, TABLES[0]),
                "t_item": boxes(ShardingType.TABLE_WISE, TABLES[1]),
            }
        }
    )
    assert_same(dist_pool.run(WORLD, train_both, plan=plan, pipelined=True))


EC_MODEL = EmbeddingModel(
    tables=[
        EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=4,
                        feature_names=list(t.feature_names))
        for t in TABLES
    ],
    fused_params={"optimizer": "rowwise_adagrad", "learning_rate": 0.1},
)  # fmt: skip
EC_TYPES = [
    ShardingType.TABLE_WISE,
    ShardingType.COLUMN_WISE,
    ShardingType.ROW_WISE,
    ShardingType.DATA_PARALLEL,
    ShardingType.TABLE_COLUMN_WISE,
]


@pytest.mark.parametrize("sharding_type", EC_TYPES)
def test_sharded_ec_vbe_equals_the_full_batch(
    dist_pool: WorkerPool, sharding_type: ShardingType
) -> None:
    # As TorchRec's sharded collection does, each output comes back at the full batch (every
    # sample's rows, read through the inverse indices), so it is the full batch's output.
    plan = ShardingPlan({"emb": {t.name: boxes(sharding_type, t) for t in EC_MODEL.tables}})
    ranks = dist_pool.run(
        WORLD,
        train_both,
        local_world_size=LOCAL.get(sharding_type),
        plan=plan,
        model=EC_MODEL,
    )
    assert all(len(r["vbe"]["grads"]) == STEPS for r in ranks)
    assert_same(ranks, pooled=False)


def vbe_output_elements(env: ShardingEnv, plan: ShardingPlan) -> int:
    """The pooled elements this rank's VBE forward receives through the output collectives."""
    import shardrec_sharders.row_wise as rw
    import shardrec_sharders.table_row_wise as trw
    import shardrec_sharders.table_wise as tw

    received = [0]
    for module in (tw, rw, trw):
        original = getattr(module, "start_all_to_all_single")  # noqa: B009

        def counted(x: Any, recv: list[int], *a: Any, _original: Any = original, **k: Any) -> Any:
            received[0] += sum(recv)
            return _original(x, recv, *a, **k)

        setattr(module, "start_all_to_all_single", counted)  # noqa: B010
    for module in (rw, trw):
        original_rs = getattr(module, "start_reduce_scatter_rows")  # noqa: B009

        def summed(
            x: torch.Tensor, in_rows: list[int], out_rows: int, *a: Any, _rs: Any = original_rs,
            **k: Any,
        ) -> Any:  # fmt: skip
            received[0] += out_rows * x[:1].numel()  # the sums' elements
            return _rs(x, in_rows, out_rows, *a, **k)

        setattr(module, "start_reduce_scatter_rows", summed)  # noqa: B010
    dmp = DistributedModelParallel(MODEL.build(7), env=env, plan=plan)
    dmp(deduplicate_features(user_item_batch(env.rank, 0), ["user", "age"]))
    return received[0]


# Elements of each rank's pooled rows, each key at its own stride: user, age (t_user, dim 4)
# and item, user (t_item, dim 6); the padded batch has USERS x ITEMS rows of every key.
PER_KEY = USERS * 4 + USERS * 4 + USERS * ITEMS * 6 + USERS * 6
# How many times they arrive: once (row-wise: as the sums of its reduce-scatter); table-row-wise
# and grid, the sums of the node's reduce-scatter, then again across nodes.
ARRIVALS = {
    ShardingType.TABLE_WISE: 1,
    ShardingType.COLUMN_WISE: 1,
    ShardingType.TABLE_COLUMN_WISE: 1,
    ShardingType.ROW_WISE: 1,
    ShardingType.TABLE_ROW_WISE: 2,
    ShardingType.GRID_SHARD: 2,
}


@pytest.mark.parametrize("sharding_type", list(ARRIVALS))
def test_vbe_pooled_rows_travel_at_each_keys_stride(
    dist_pool: WorkerPool, sharding_type: ShardingType
) -> None:
    # A module that mixes user keys (USERS unique samples) and item keys (the full batch): each
    # key's pooled rows travel USERS or USERS x ITEMS of them, not the largest key's count.
    plan = ShardingPlan({"emb": {t.name: boxes(sharding_type, t) for t in TABLES}})
    ranks = dist_pool.run(
        WORLD, vbe_output_elements, local_world_size=LOCAL.get(sharding_type), plan=plan
    )
    assert ranks == [PER_KEY * ARRIVALS[sharding_type]] * WORLD
    assert PER_KEY < USERS * ITEMS * (4 + 4 + 6 + 6)


def ec_ids(env: ShardingEnv, sharding_type: ShardingType) -> list[dict[str, list[list[int]]]]:
    """Each output's ids per sample (need_indices), for the full batch and its VBE form."""
    from shardrec import EmbeddingCollection

    got = []
    for vbe in (False, True):
        torch.manual_seed(3)
        tables = [t for t in EC_MODEL.tables if isinstance(t, EmbeddingConfig)]
        ec = EmbeddingCollection(tables=tables, need_indices=True)
        plan = ShardingPlan({"": {t.name: boxes(sharding_type, t) for t in EC_MODEL.tables}})
        dmp = DistributedModelParallel(ec, env=env, plan=plan)
        kjt = user_item_batch(env.rank, 1)
        out = dmp(deduplicate_features(kjt, ["user", "age"]) if vbe else kjt)
        got.append(
            {
                name: [w.tolist() for w in torch.split(jt.weights(), jt.lengths().tolist())]
                for name, jt in sorted(out.items())
            }
        )
    return got


@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE, ShardingType.ROW_WISE])
def test_sharded_ec_vbe_gives_every_samples_ids(
    dist_pool: WorkerPool, sharding_type: ShardingType
) -> None:
    for full, vbe in dist_pool.run(WORLD, ec_ids, sharding_type=sharding_type):
        assert len(full["user@t_user"]) == USERS * ITEMS
        assert any(full["user@t_user"])
        assert vbe == full
