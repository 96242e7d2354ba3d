"""A bad batch on any rank raises on every rank, under every built-in sharding type.

Each case shards a small EmbeddingBagCollection or EmbeddingCollection over 2 gloo processes (the
pooled workers of conftest.py, which time a hung case out). One rank (or both) gets a bad batch:
an id outside its table, a negative length, or ids that are not integers. Every rank must raise
the same BadBatchError naming the bad rank, the feature, the table and the user's id (the global
row, not a shard-local one), and no rank may return output. Then every rank runs a good training
step, which shows that no collective was left half done.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import (
    column_wise,
    data_parallel,
    even_splits,
    row_wise,
    table_wise,
)
from shardrec.distributed.types import ParameterSharding
from shardrec.kernels import BadBatchError
from shardrec.testing import EmbeddingModel, HeadModel

from ._two_level import sharding as sharding_of

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]

# (name, rows, dim, features): "c" reads t1, whose rows 0..12 are split over the ranks row-wise.
TABLES = [("t0", 10, 4, ["a"]), ("t1", 13, 8, ["b", "c"])]
KEYS = ["a", "b", "c"]
WORLD = 2
EC_DIM = 4  # the EmbeddingCollection puts every table at this dim
SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel"]
# The two-level types on one node of two ranks (LOCAL_WORLD_SIZE unset): bags only.
TWO_LEVEL = ["table_row_wise", "grid_shard", "table_column_wise"]


def build_model(kind: str) -> HeadModel:
    fused = {"optimizer": "sgd", "learning_rate": 0.1}
    if kind == "ec":
        seqs = [
            EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=EC_DIM, feature_names=f)
            for n, r, _, f in TABLES
        ]
        return EmbeddingModel(tables=seqs, fused_params=fused).build(seed=0)
    bags = [
        EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f)
        for n, r, d, f in TABLES
    ]
    return EmbeddingModel(tables=bags, fused_params=fused).build(seed=0)


def two_level(sharding: str, rows: int, dim: int) -> ParameterSharding:
    """(row offset, col offset, rows, cols, rank) boxes over ranks 0 and 1 of the one node."""
    row_blocks = even_splits(rows, WORLD)
    col_blocks = even_splits(dim, WORLD)
    if sharding == "table_row_wise":
        boxes = [(r0, 0, n, dim, r) for r, (r0, n) in enumerate(row_blocks)]
    elif sharding == "table_column_wise":
        boxes = [(0, c0, rows, n, r) for r, (c0, n) in enumerate(col_blocks)]
    else:  # grid: every column slice row-split over the node's ranks
        boxes = [
            (r0, c0, n, nc, r) for c0, nc in col_blocks for r, (r0, n) in enumerate(row_blocks)
        ]
    return sharding_of(sharding, boxes)


def plan_for(sharding: str, kind: str = "ebc") -> dict[str, ParameterSharding]:
    plans: dict[str, ParameterSharding] = {}
    for i, (name, rows, ebc_dim, _) in enumerate(TABLES):
        dim = ebc_dim if kind == "ebc" else EC_DIM
        if sharding == "table_wise":
            plans[name] = table_wise(i % WORLD, rows, dim)
        elif sharding == "row_wise":
            plans[name] = row_wise(rows, dim, WORLD)
        elif sharding == "column_wise":
            plans[name] = column_wise(rows, dim, list(range(WORLD)))
        elif sharding in TWO_LEVEL:
            plans[name] = two_level(sharding, rows, dim)
        else:
            plans[name] = data_parallel(rows, dim, WORLD)
    return plans


def make_kjt(keys: list[str], values: torch.Tensor, lengths: torch.Tensor) -> KeyedJaggedTensor:
    try:
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    except TypeError:
        # A container that refuses float ids itself: build it as one that accepts TorchRec's
        # float values would, so that the sharded module's own refusal is what is tested.
        stride = lengths.numel() // len(keys)
        parts = (values, None, lengths, None, stride, None, None)
        return KeyedJaggedTensor._trusted(keys, None, *parts)


def batch(rank: int, problem: str | None) -> KeyedJaggedTensor:
    """Two samples per rank: a = [[1], [rank]], b = [[2, 3], []], c = [[4], [5 + rank]]."""
    lengths = torch.tensor([1, 1, 2, 0, 1, 1])
    ids = [1, rank, 2, 3, 4, 5 + rank]
    if problem == "out_of_range":
        ids[5] = 13  # feature c, sample 1: one past t1's last row
    elif problem == "negative_length":
        lengths = torch.tensor([1, 1, 3, -1, 1, 1])  # b's lengths still add up to its 2 ids
    values = torch.tensor(ids, dtype=torch.float32 if problem == "float" else torch.int64)
    return make_kjt(KEYS, values, lengths)


def bad_batch_case(
    env: ShardingEnv, kind: str, sharding: str, problem: str, bad_ranks: list[int]
) -> dict[str, Any]:
    model = build_model(kind)
    plan = ShardingPlan({"emb": plan_for(sharding, kind)})
    dmp = DistributedModelParallel(model, env=env, plan=plan, device=torch.device("cpu"))
    result: dict[str, Any] = {"check_inputs": getattr(dmp.module.emb, "check_inputs", None)}
    try:
        dmp(batch(env.rank, problem if env.rank in bad_ranks else None))
        result["error"] = None
    except BadBatchError as exc:
        result["error"] = str(exc)
        result["ranks"] = exc.ranks
    # Every rank then trains on a good batch: the failed forward left no collective behind.
    _, loss = dmp(batch(env.rank, None))
    loss.backward()
    result["good_step"] = float(loss.detach())
    return result


# The words every rank's error must contain, per problem: the rank, the feature, the table, and
# the user's id or length.
EXPECTED = {
    "out_of_range": [
        "id 13 of feature 'c' (position 1 of its ids, sample 1) is out of range for table 't1'",
        "num_embeddings=13",
    ],
    "negative_length": ["negative length -1 for feature 'b' (table 't1') at sample 1"],
    "float": ["dtype torch.float32, but the ids of features", "'c' (table 't1')"],
}


def check_everyone_raised(
    results: list[dict[str, Any]], problem: str, bad_ranks: list[int]
) -> None:
    for rank, result in enumerate(results):
        message = result["error"]
        assert message is not None, f"rank {rank} returned output for a bad batch"
        assert result["ranks"] == tuple(bad_ranks)
        assert f"the batch of rank(s) {bad_ranks} failed its checks" in message
        for bad in bad_ranks:
            line = next(x for x in message.splitlines() if x.strip().startswith(f"rank {bad}:"))
            for words in EXPECTED[problem]:
                assert words in line, f"rank {rank}'s error lacks {words!r}: {message}"
        assert result["good_step"] == result["good_step"]  # a number: the good step ran


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_an_id_out_of_range_on_one_rank_raises_on_every_rank(
    dist_pool: Any, kind: str, sharding: str
) -> None:
    results = dist_pool.run(
        WORLD, bad_batch_case, kind=kind, sharding=sharding, problem="out_of_range", bad_ranks=[1]
    )
    check_everyone_raised(results, "out_of_range", [1])


@pytest.mark.parametrize("problem", ["out_of_range", "negative_length", "float"])
@pytest.mark.parametrize("sharding", TWO_LEVEL)
def test_two_level_shardings_raise_on_every_rank(
    dist_pool: Any, sharding: str, problem: str
) -> None:
    results = dist_pool.run(
        WORLD, bad_batch_case, kind="ebc", sharding=sharding, problem=problem, bad_ranks=[1]
    )
    check_everyone_raised(results, problem, [1])


@pytest.mark.parametrize("problem", ["negative_length", "float"])
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_negative_lengths_and_float_ids_on_one_rank_raise_on_every_rank(
    dist_pool: Any, sharding: str, problem: str
) -> None:
    results = dist_pool.run(
        WORLD, bad_batch_case, kind="ebc", sharding=sharding, problem=problem, bad_ranks=[0]
    )
    check_everyone_raised(results, problem, [0])


@pytest.mark.parametrize("sharding", ["row_wise", "data_parallel"])
def test_every_bad_rank_is_named(dist_pool: Any, sharding: str) -> None:
    results = dist_pool.run(
        WORLD,
        bad_batch_case,
        kind="ebc",
        sharding=sharding,
        problem="out_of_range",
        bad_ranks=[0, 1],
    )
    check_everyone_raised(results, "out_of_range", [0, 1])
    assert all(r["check_inputs"] is True for r in results)


def unchecked_case(env: ShardingEnv, sharding: str) -> list[bool]:
    model = build_model("ebc")
    model.emb.check_inputs = False
    dmp = DistributedModelParallel(
        model, env=env, plan=ShardingPlan({"emb": plan_for(sharding)}), device=torch.device("cpu")
    )
    _, loss = dmp(batch(env.rank, None))
    loss.backward()
    return [bool(m.check_inputs) for m in dmp.module.modules() if hasattr(m, "guard")]


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_the_sharded_module_inherits_check_inputs(dist_pool: Any, sharding: str) -> None:
    for flags in dist_pool.run(WORLD, unchecked_case, sharding=sharding):
        assert flags == [False]


def copy_case(env: ShardingEnv) -> str:
    import copy
    import pickle

    model = build_model("ebc")
    dmp = DistributedModelParallel(
        model, env=env, plan=ShardingPlan({"emb": plan_for("row_wise")}), device=torch.device("cpu")
    )
    messages = []
    for attempt in (copy.deepcopy, pickle.dumps):
        try:
            attempt(dmp)
        except TypeError as exc:
            messages.append(str(exc))
    return "\n".join(messages)


def test_a_distributed_model_parallel_refuses_to_be_copied(dist_pool: Any) -> None:
    for messages in dist_pool.run(WORLD, copy_case):
        assert messages.count("DistributedModelParallel cannot be copied or pickled") == 2
