"""Managed-collision modules under the pipelined training loop train exactly as the plain loop.

Each case builds the managed model of ``test_managed_sharded`` (tables of 13 and 7 rows fed ids
from a pool of 32, so that rows are admitted, evicted and reset every few steps) twice on every
rank of a gloo group, trains one copy with :class:`TrainPipelineBase` and the other with
:class:`TrainPipelineSparseDist` on the same batches (two epochs, the same pipeline), and returns
each copy's losses and output rows, table shards, fused and dense optimizer state, id maps,
counters and reset stream: they must be equal, bit for bit. Only the routing of batch i+1's ids
to their buckets' owners runs during step i; the remapping runs in batch i+1's own step, after
batch i's update, so an eviction never resets a row before the update of the batch that read it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shardrec import KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardedEmbeddingModule, ShardingEnv
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.train_pipeline import (
    PipelineFallbackWarning,
    TrainPipelineBase,
    TrainPipelineSparseDist,
)
from shardrec.modules import BadBatchError, EmbeddingBagCollection
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec_sharders.data_parallel import DataParallelSharder
from shardrec_sharders.managed_collision import (
    ManagedCollisionSharder,
    ShardedManagedCollisionEmbeddings,
)

from .test_managed_sharded import KEYS, SPLIT, Buckets, batch, build, plan_of
from .test_train_pipeline import OpaqueRowWise

pytestmark = pytest.mark.multiprocess

WORLD = 2
EPOCHS = ((0, 4), (4, 8))  # the steps of each epoch; a new iterator each, the same pipeline
STEPS = EPOCHS[-1][1]
SAVED_AT = 3  # progress calls before the mid-run checkpoint (batch 3 is then staged)


@dataclass(frozen=True, slots=True)
class Batch:
    kjt: KeyedJaggedTensor
    step: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self


def model_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
    rows, loss = model(batch.kjt)  # the managed module is called with the batch's own KJT
    return loss, (loss.detach().clone(), rows.detach().clone())


def batches(env: ShardingEnv, steps: range, *, bad_at: int | None = None) -> Iterator[Batch]:
    for step in steps:
        kjt = batch(step, env.world_size, env.rank)
        if step == bad_at and env.rank == 1:
            kjt = KeyedJaggedTensor(keys=KEYS, values=kjt.values().float(), lengths=kjt.lengths())
        yield Batch(kjt, step)


@dataclass(slots=True)
class Run:
    dmp: DistributedModelParallel
    optimizer: torch.optim.Optimizer
    pipeline: Any


def setup(
    env: ShardingEnv,
    kind: str,
    sequence: bool,
    buckets: Buckets,
    piped: bool,
    opaque: bool = False,
) -> Run:
    """``opaque``: the inner EBC's row-wise tables go to a plugin sharder whose module has no
    pipeline split (the inner module then runs whole in the lookup stage)."""
    optimizer = "exact_adagrad" if kind == "column_wise" else "rowwise_adagrad"
    sharders = None
    if opaque:
        inner = [OpaqueRowWise(EmbeddingBagCollection), DataParallelSharder(EmbeddingBagCollection)]
        sharders = [ManagedCollisionSharder(ManagedCollisionEmbeddingBagCollection, inner)]
    dmp = DistributedModelParallel(
        build(optimizer, sequence, buckets),
        env=env,
        plan=plan_of(kind, env.world_size, sequence),
        sharders=sharders,
    )
    dense = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    cls = TrainPipelineSparseDist if piped else TrainPipelineBase
    return Run(dmp, dense, cls(dmp, dense, torch.device("cpu"), forward=model_forward))


def managed(dmp: DistributedModelParallel) -> ShardedManagedCollisionEmbeddings:
    mc = dmp.module.mc
    assert isinstance(mc, ShardedManagedCollisionEmbeddings)
    return mc


def state_of(run: Run) -> dict[str, Any]:
    """This rank's table shards, fused and dense optimizer state, reset stream, maps, counters."""
    mc = managed(run.dmp)
    tensors: dict[str, torch.Tensor] = {}
    inner = mc.embedding_module
    assert isinstance(inner, ShardedEmbeddingModule)
    for table, ts in inner.local_table_shards().items():
        for i, s in enumerate(ts.weight):
            tensors[f"{table}.weight.{i}"] = s.tensor.detach().clone()
        for name, shards in ts.optimizer_state.items():
            for i, s in enumerate(shards):
                tensors[f"{table}.{name}.{i}"] = s.tensor.detach().clone()
    dense = run.dmp.module.dense
    assert isinstance(dense, nn.Linear)
    for name, p in dense.named_parameters():
        tensors[f"dense.{name}"] = p.detach().clone()
        tensors[f"dense.{name}.momentum"] = run.optimizer.state[p]["momentum_buffer"].clone()
    tensors["reset_rng_state"] = dict(mc.named_buffers())["_reset_rng_state"].clone()
    collection = mc.managed_collision_collection
    return {"tensors": tensors, "maps": collection.held_ids(), "stats": collection.stats()}


def train(run: Run, env: ShardingEnv, epochs: tuple[tuple[int, int], ...]) -> list[Any]:
    outputs = []
    for first, end in epochs:
        it = batches(env, range(first, end))
        while True:
            try:
                outputs.append(run.pipeline.progress(it))
            except StopIteration:
                break
    return outputs


def case_equal(
    env: ShardingEnv, kind: str, sequence: bool, buckets: Buckets, opaque: bool = False
) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for piped in (False, True):
        run = setup(env, kind, sequence, buckets, piped, opaque)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = train(run, env, EPOCHS)
        got["piped" if piped else "plain"] = {
            "outputs": outputs,
            **state_of(run),
            "warnings": [str(w.message) for w in caught if w.category is PipelineFallbackWarning],
            "pipelined": run.pipeline.pipelined_modules if piped else None,
        }
    return got


def assert_same_state(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    assert sorted(a["tensors"]) == sorted(b["tensors"]), where
    for key, value in a["tensors"].items():
        assert torch.equal(value, b["tensors"][key]), f"{where}: {key} differs"
    assert a["maps"] == b["maps"], f"{where}: id-to-row maps differ"
    assert a["stats"] == b["stats"], f"{where}: counters differ"


def assert_same_outputs(a: list[Any], b: list[Any], where: str) -> None:
    assert len(a) == len(b), where
    for step, ((loss_a, rows_a), (loss_b, rows_b)) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(loss_a, loss_b), f"{where}: loss of step {step}"
        assert torch.equal(rows_a, rows_b), f"{where}: output rows of step {step}"


@pytest.mark.parametrize(
    ("kind", "sequence", "buckets"),
    [
        ("row_wise", False, SPLIT),
        ("table_wise", False, 1),
        ("column_wise", False, SPLIT),
        ("data_parallel", False, SPLIT),
        ("mixed", False, SPLIT),  # row-wise and data-parallel tables: the inner module is a group
        ("mixed", True, SPLIT),
    ],
)
def test_pipelined_managed_module_trains_as_the_plain_loop(
    dist_pool: Any, kind: str, sequence: bool, buckets: Buckets
) -> None:
    results = dist_pool.run(WORLD, case_equal, kind=kind, sequence=sequence, buckets=buckets)
    for rank, r in enumerate(results):
        plain, piped = r["plain"], r["piped"]
        assert len(plain["outputs"]) == STEPS
        assert_same_outputs(plain["outputs"], piped["outputs"], f"rank {rank}")
        assert_same_state(plain, piped, f"rank {rank}")
        assert piped["pipelined"] == ["mc"], piped["warnings"]
        assert piped["warnings"] == []
    assert_evicts(results)


def assert_evicts(results: list[Any]) -> None:
    stats = results[0]["plain"]["stats"]
    # The stream evicts (rows reset to fresh weights) and admits: the state the pipeline must
    # not move ahead of the updates.
    assert stats["t0"].evicted_total > 0
    assert stats["t1"].admitted_total > 0


def test_an_inner_module_without_the_split_runs_whole_in_the_lookup_stage(dist_pool: Any) -> None:
    # Its row-wise part comes from a plugin sharder without input_dist: the managed module is
    # still pipelined (its routing), and trains as the plain loop.
    results = dist_pool.run(
        WORLD, case_equal, kind="mixed", sequence=False, buckets=SPLIT, opaque=True
    )
    for rank, r in enumerate(results):
        plain, piped = r["plain"], r["piped"]
        assert_same_outputs(plain["outputs"], piped["outputs"], f"rank {rank}")
        assert_same_state(plain, piped, f"rank {rank}")
        assert piped["pipelined"] == ["mc"], piped["warnings"]
        assert piped["warnings"] == []
    assert_evicts(results)


# -- a checkpoint taken mid-run, with the next batch's ids in flight ------------------------------


def case_resume(env: ShardingEnv, root: str) -> dict[str, Any]:
    kind, buckets = "row_wise", SPLIT
    plain = setup(env, kind, False, buckets, piped=False)
    plain_out = train(plain, env, ((0, STEPS),))
    # Saved between two steps of a pipeline that has batch SAVED_AT staged, its ids routed.
    first = setup(env, kind, False, buckets, piped=True)
    it = batches(env, range(STEPS))
    first_out = [first.pipeline.progress(it) for _ in range(SAVED_AT)]
    save(root, first.dmp, step=SAVED_AT, optimizer=first.optimizer, pg=env.pg)
    while True:
        try:
            first_out.append(first.pipeline.progress(it))
        except StopIteration:
            break
    resumed = setup(env, kind, False, buckets, piped=True)
    assert load(root, resumed.dmp, optimizer=resumed.optimizer, pg=env.pg) == SAVED_AT
    resumed_out = train(resumed, env, ((SAVED_AT, STEPS),))
    return {
        "plain": {"outputs": plain_out, **state_of(plain)},
        "first": {"outputs": first_out, **state_of(first)},
        "resumed": {"outputs": resumed_out, **state_of(resumed)},
    }


def test_a_checkpoint_taken_mid_run_resumes_identically(dist_pool: Any, tmp_path: Path) -> None:
    results = dist_pool.run(WORLD, case_resume, root=str(tmp_path / "ck"))
    for rank, r in enumerate(results):
        plain = r["plain"]
        assert_same_outputs(plain["outputs"], r["first"]["outputs"], f"rank {rank}, saving run")
        assert_same_state(plain, r["first"], f"rank {rank}, saving run")
        resumed = r["resumed"]
        assert_same_outputs(plain["outputs"][SAVED_AT:], resumed["outputs"], f"rank {rank}")
        assert_same_state(plain, resumed, f"rank {rank}, resumed run")


# -- a refused batch under the pipeline ---------------------------------------------------------


def case_bad_batch(env: ShardingEnv, bad_at: int) -> dict[str, Any]:
    piped = setup(env, "row_wise", False, SPLIT, piped=True)
    it = batches(env, range(STEPS), bad_at=bad_at)
    done, errors = 0, []
    while True:
        try:
            piped.pipeline.progress(it)
            done += 1
        except BadBatchError as error:
            errors.append((str(error), error.ranks))
        except StopIteration:
            break
    # The plain loop over the same batches, without the refused one.
    plain = setup(env, "row_wise", False, SPLIT, piped=False)
    kept = (b for b in batches(env, range(STEPS)) if b.step != bad_at)
    while True:
        try:
            plain.pipeline.progress(kept)
        except StopIteration:
            break
    return {"done": done, "errors": errors, "piped": state_of(piped), "plain": state_of(plain)}


@pytest.mark.parametrize("bad_at", [0, 1, 4])
def test_a_refused_batch_raises_on_every_rank_and_the_pipeline_goes_on(
    dist_pool: Any, bad_at: int
) -> None:
    results = dist_pool.run(WORLD, case_bad_batch, bad_at=bad_at)
    for rank, r in enumerate(results):
        assert r["done"] == STEPS - 1
        assert len(r["errors"]) == 1
        message, ranks = r["errors"][0]
        assert ranks == (1,)
        if rank == 1:
            assert "rank 1: managed ids must be int64 or int32" in message
        else:
            assert "rank(s) [1]" in message
        assert_same_state(r["plain"], r["piped"], f"rank {rank}")
