"""The pipelined training loop trains exactly as the plain one, for every sharding type.

Each case builds the same model twice on every rank of a gloo group, trains one copy with
:class:`TrainPipelineBase` (copy, forward, backward, step) and the other with
:class:`TrainPipelineSparseDist` (the next batch's ids in flight while the current one trains) on
the same batches, and returns both copies' weights, fused optimizer state and dense parameters:
they must be equal. Two-level types (table-row-wise, grid, table-column-wise) run with
``LOCAL_WORLD_SIZE=2``: one node of 2 at 2 processes, two nodes of 2 at 4.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from shardrec import KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.sharding_plan import (
    column_wise,
    data_parallel,
    even_splits,
    row_wise,
    table_wise,
)
from shardrec.distributed.train_pipeline import (
    PipelineFallbackWarning,
    TrainPipelineBase,
    TrainPipelineSparseDist,
)
from shardrec.distributed.types import ParameterSharding
from shardrec.kernels import BadBatchError
from shardrec.modules import EmbeddingBagCollection
from shardrec.testing import GlobalBatch, HeadModel, WorkerPool
from shardrec_sharders.row_wise import RowWiseSharder

from ._two_level import EC_DIM, TABLES, model, sharding

pytestmark = pytest.mark.multiprocess

STEPS = 5
EPOCHS = 2
LR = 0.05
LOCAL = 2


@dataclass(frozen=True, slots=True)
class Batch:
    kjt: KeyedJaggedTensor
    tag: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self


def model_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    rows, loss = model(batch.kjt)
    return loss, rows.detach()


def batches(env: ShardingEnv, n: int, *, bad_at: int | None = None) -> Iterator[Batch]:
    sizes = [2 + r for r in range(env.world_size)]
    for step in range(n):
        rows = model("ebc").feature_rows
        kjt = GlobalBatch.random(rows, sizes, seed=2000 + step).kjt(env.rank)
        if step == bad_at and env.rank == env.world_size - 1:
            values = kjt.values().clone()
            values[0] = 10_000  # outside every table
            kjt = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
        yield Batch(kjt, step)


def _nodes(world: int) -> list[list[int]]:
    return [list(range(n * LOCAL, (n + 1) * LOCAL)) for n in range(max(1, world // LOCAL))]


def _rows_in_node(kind: str, rows: int, c0: int, nc: int, node: list[int]) -> ParameterSharding:
    boxes = [(at, c0, n, nc, r) for r, (at, n) in zip(node, even_splits(rows, LOCAL), strict=True)]
    return sharding(kind, [b for b in boxes if b[2]])


def table_plan(how: str, i: int, rows: int, dim: int, world: int) -> ParameterSharding:
    nodes = _nodes(world)
    node = nodes[i % len(nodes)]
    if how == "table_wise":
        return table_wise(i % world, rows, dim)
    if how == "row_wise":
        return row_wise(rows, dim, world)
    if how == "column_wise":
        return column_wise(rows, dim, [i % world, (i + 1) % world])
    if how == "data_parallel":
        return data_parallel(rows, dim, world)
    if how == "table_row_wise":
        return _rows_in_node("table_row_wise", rows, 0, dim, node)
    if how == "grid_shard":
        half = dim // 2
        other = nodes[(i + 1) % len(nodes)]
        boxes = [
            (at, c0, n, nc, r)
            for c0, nc, nd in ((0, half, node), (half, dim - half, other))
            for r, (at, n) in zip(nd, even_splits(rows, LOCAL), strict=True)
            if n
        ]
        return sharding("grid_shard", boxes)
    if how == "table_column_wise":
        boxes = [
            (0, at, rows, n, r) for r, (at, n) in zip(node, even_splits(dim, LOCAL), strict=True)
        ]
        return sharding("table_column_wise", boxes)
    raise ValueError(how)


MIXED = ["table_wise", "row_wise", "column_wise", "data_parallel"]


def make_plan(how: str, world: int, kind: str = "ebc") -> ShardingPlan:
    kinds = MIXED if how == "mixed" else [how] * len(TABLES)
    return ShardingPlan(
        {
            "emb": {
                name: table_plan(how_t, i, rows, dim if kind == "ebc" else EC_DIM, world)
                for i, (how_t, (name, rows, dim, _)) in enumerate(zip(kinds, TABLES, strict=True))
            }
        }
    )


def build(kind: str) -> HeadModel:
    return model(kind, optimizer="rowwise_adagrad").build(seed=11)


def state_of(
    dmp: DistributedModelParallel, model: HeadModel, fqn: str = "emb"
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for table, ts in dmp.local_table_shards()[fqn].items():
        for i, s in enumerate(ts.weight):
            out[f"{table}.weight.{i}"] = s.tensor.detach().clone()
        for name, shards in ts.optimizer_state.items():
            for i, s in enumerate(shards):
                out[f"{table}.{name}.{i}"] = s.tensor.detach().clone()
    for name, p in model.dense.named_parameters():
        out[f"dense.{name}"] = p.detach().clone()
    return out


def train(env: ShardingEnv, how: str, kind: str, pipelined: bool, n: int) -> dict[str, Any]:
    model = build(kind)
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(how, env.world_size, kind))
    dense = [p for p in dmp.parameters() if p.requires_grad]
    opt = torch.optim.SGD(dense, lr=LR)
    cls = TrainPipelineSparseDist if pipelined else TrainPipelineBase
    pipeline: Any = cls(dmp, opt, torch.device("cpu"), forward=model_forward)
    outputs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(EPOCHS):  # a new iterator per epoch, the same pipeline
            it = batches(env, n)
            while True:
                try:
                    outputs.append(pipeline.progress(it))
                except StopIteration:
                    break
    got = {"state": state_of(dmp, model), "outputs": outputs}
    got["warnings"] = [str(w.message) for w in caught if w.category is PipelineFallbackWarning]
    if pipelined:
        got["pipelined"] = pipeline.pipelined_modules
    return got


def case_equal(env: ShardingEnv, how: str, kind: str) -> dict[str, Any]:
    plain = train(env, how, kind, pipelined=False, n=STEPS)
    piped = train(env, how, kind, pipelined=True, n=STEPS)
    return {"plain": plain, "piped": piped}


def assert_same(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        plain, piped = r["plain"], r["piped"]
        assert len(piped["outputs"]) == len(plain["outputs"]) == EPOCHS * STEPS
        for step, (a, b) in enumerate(zip(plain["outputs"], piped["outputs"], strict=True)):
            assert torch.equal(a, b), f"rank {rank} output of step {step}"
        assert sorted(plain["state"]) == sorted(piped["state"])
        for key, value in plain["state"].items():
            assert torch.equal(value, piped["state"][key]), f"rank {rank}: {key} differs"
        assert piped["pipelined"] == ["emb"], piped["warnings"]
        assert piped["warnings"] == []


ALL = [
    "table_wise",
    "row_wise",
    "column_wise",
    "data_parallel",
    "table_row_wise",
    "grid_shard",
    "table_column_wise",
    "mixed",
]


@pytest.mark.parametrize("how", ALL)
def test_pipelined_weights_equal_plain_at_2(dist_pool: WorkerPool, how: str) -> None:
    assert_same(dist_pool.run(2, case_equal, local_world_size=LOCAL, how=how, kind="ebc"))


@pytest.mark.parametrize("how", ["table_wise", "row_wise", "column_wise", "mixed"])
def test_pipelined_sequence_embeddings_equal_plain_at_2(dist_pool: WorkerPool, how: str) -> None:
    assert_same(dist_pool.run(2, case_equal, local_world_size=LOCAL, how=how, kind="ec"))


@pytest.mark.parametrize("how", ["row_wise", "table_row_wise", "grid_shard", "mixed"])
def test_pipelined_weights_equal_plain_at_4_two_nodes(dist_pool: WorkerPool, how: str) -> None:
    assert_same(dist_pool.run(4, case_equal, local_world_size=LOCAL, how=how, kind="ebc"))


def test_the_plain_loop_is_the_reference_loop(dist_pool: WorkerPool) -> None:
    # TrainPipelineBase is what the equality above compares against: it must be the loop the
    # equivalence tests prove against the unsharded model (forward, backward, step, in order).
    results = dist_pool.run(2, case_plain_is_manual)
    for r in results:
        for key, value in r["manual"].items():
            assert torch.equal(value, r["base"][key]), key


def case_plain_is_manual(env: ShardingEnv) -> dict[str, Any]:
    base = train(env, "row_wise", "ebc", pipelined=False, n=STEPS)["state"]
    model = build("ebc")
    dmp = DistributedModelParallel(model, env=env, plan=make_plan("row_wise", env.world_size))
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    for batch in [b for _ in range(EPOCHS) for b in batches(env, STEPS)]:
        _, loss = dmp(batch.kjt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"base": base, "manual": state_of(dmp, model)}


# -- a bad batch under the pipeline ---------------------------------------------------------------


def case_bad_batch(env: ShardingEnv, how: str, bad_at: int) -> dict[str, Any]:
    model = build("ebc")
    dmp = DistributedModelParallel(model, env=env, plan=make_plan(how, env.world_size))
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), forward=model_forward)
    it = batches(env, STEPS, bad_at=bad_at)
    done, errors = 0, []
    while True:
        try:
            pipeline.progress(it)
            done += 1
        except BadBatchError as error:
            errors.append(str(error))
        except StopIteration:
            break
    # A plain loop over the same batches, skipping the bad one on every rank.
    ref_model = build("ebc")
    ref = DistributedModelParallel(ref_model, env=env, plan=make_plan(how, env.world_size))
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR)
    for batch in batches(env, STEPS):
        if batch.tag == bad_at:
            continue
        _, loss = ref(batch.kjt)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
    return {
        "done": done,
        "errors": errors,
        "state": state_of(dmp, model),
        "ref": state_of(ref, ref_model),
    }


@pytest.mark.parametrize(
    ("how", "world"),
    [
        ("table_wise", 2),
        ("row_wise", 2),
        ("column_wise", 2),
        ("data_parallel", 2),
        ("mixed", 2),
        ("table_row_wise", 4),
        ("grid_shard", 4),
    ],
)
@pytest.mark.parametrize("bad_at", [0, 2])
def test_a_bad_batch_raises_on_every_rank_and_the_pipeline_goes_on(
    dist_pool: WorkerPool, how: str, world: int, bad_at: int
) -> None:
    results = dist_pool.run(world, case_bad_batch, local_world_size=LOCAL, how=how, bad_at=bad_at)
    for r in results:
        assert r["done"] == STEPS - 1
        assert len(r["errors"]) == 1
        assert f"rank(s) [{len(results) - 1}]" in r["errors"][0]
        assert "10000" in r["errors"][0]
        for key, value in r["ref"].items():
            assert torch.equal(value, r["state"][key]), key


# -- fallback -----------------------------------------------------------------------------------


class Rekeyed(nn.Module):
    """A model that builds a new KJT before the sharded module sees it: it cannot be pipelined."""

    def __init__(self, inner: HeadModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        copy = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() + 0, lengths=kjt.lengths())
        return self.inner(copy)


def case_fallback(env: ShardingEnv) -> dict[str, Any]:
    out = {}
    for wrapped in (False, True):
        model = build("ebc")
        top: nn.Module = Rekeyed(model) if wrapped else model
        dmp = DistributedModelParallel(top, env=env, plan=_plan_for(wrapped, env.world_size))
        opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR)
        pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), forward=model_forward)
        it = batches(env, STEPS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(STEPS):
                pipeline.progress(it)
        out[str(wrapped)] = {
            "warnings": [str(w.message) for w in caught if w.category is PipelineFallbackWarning],
            "pipelined": pipeline.pipelined_modules,
            "state": state_of(dmp, model, "inner.emb" if wrapped else "emb"),
        }
    return out


def _plan_for(wrapped: bool, world: int) -> ShardingPlan:
    plan = make_plan("row_wise", world)
    return ShardingPlan({"inner.emb": plan.plan["emb"]}) if wrapped else plan


def test_a_model_that_transforms_the_kjt_falls_back_with_one_warning(dist_pool: WorkerPool) -> None:
    for r in dist_pool.run(2, case_fallback):
        plain, wrapped = r["False"], r["True"]
        assert plain["pipelined"] == ["emb"]
        assert plain["warnings"] == []
        assert wrapped["pipelined"] == []
        assert len(wrapped["warnings"]) == 1
        assert "'inner.emb' is not pipelined" in wrapped["warnings"][0]
        assert "transforms its KJT" in wrapped["warnings"][0]
        # It still trains, unpipelined, to the same weights (values + 0 are the same ids).
        for key, value in plain["state"].items():
            assert torch.equal(value, wrapped["state"][key]), key


class Opaque(nn.Module):
    """What a plugin sharder may return: a sharded module without the input_dist split."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, kjt: KeyedJaggedTensor) -> Any:
        return self.inner(kjt)

    def local_table_shards(self) -> Any:
        return self.inner.local_table_shards()


class OpaqueRowWise(RowWiseSharder):
    def shard(self, module: nn.Module, params: Any, env: ShardingEnv, device: Any) -> nn.Module:
        return Opaque(super().shard(module, params, env, device))


def case_plugin_without_split(env: ShardingEnv) -> dict[str, Any]:
    model = build("ebc")
    sharder = OpaqueRowWise(EmbeddingBagCollection)
    dmp = DistributedModelParallel(
        model, env=env, plan=make_plan("row_wise", env.world_size), sharders=[sharder]
    )
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), forward=model_forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(EPOCHS):
            it = batches(env, STEPS)
            for _ in range(STEPS):
                pipeline.progress(it)
    return {
        "warnings": [str(w.message) for w in caught if w.category is PipelineFallbackWarning],
        "pipelined": pipeline.pipelined_modules,
        "state": state_of(dmp, model),
    }


def test_a_plugin_module_without_the_split_trains_unpipelined_with_one_warning(
    dist_pool: WorkerPool,
) -> None:
    plain = dist_pool.run(2, case_equal, local_world_size=LOCAL, how="row_wise", kind="ebc")
    for r, p in zip(dist_pool.run(2, case_plugin_without_split), plain, strict=True):
        assert r["pipelined"] == []
        assert len(r["warnings"]) == 1
        assert "'emb' is not pipelined: Opaque has no input_dist" in r["warnings"][0]
        # It trains, unpipelined, as the plain loop does.
        for key, value in p["plain"]["state"].items():
            assert torch.equal(value, r["state"][key]), key
