"""``check_sharding``: one call that trains a sharded model and the unsharded one side by side and
says where they differ."""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence

from shardrec.distributed import ModuleSharder, ParameterSharding, ShardingPlan
from shardrec.distributed.checkpoint import CheckpointError, load
from shardrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from shardrec.distributed.plugins import load_sharder_registry
from shardrec.testing._batches import Batches, GlobalBatch
from shardrec.testing._compare import (
    compare_outputs,
    compare_steps,
    compare_table_grads,
    compare_tables,
    compare_whole,
)
from shardrec.testing._errors import RankFailedError
from shardrec.testing._model import EMBEDDING_FQN, EmbeddingModel
from shardrec.testing._pool import WorkerPool
from shardrec.testing._ranks import (
    DEFAULT_DENSE_OPTIMIZER,
    DenseOptimizer,
    RankRun,
    load_on_rank,
    train_on_rank,
)
from shardrec.testing._reference import Reference, reference_outputs, train_reference
from shardrec.testing._report import EquivalenceError, EquivalenceReport, Mismatch, Tolerance

__all__ = ["PlanForWorld", "check_sharding"]

PlanForWorld = Callable[[int], Mapping[str, ParameterSharding]]
"""World size -> table name -> how that table is sharded (the plan of the model's one module)."""

_MODEL_SEED = 1234
_BATCH_SEED = 1000
_RELOAD_BATCH_SEED = 1100


@dataclasses.dataclass(frozen=True, slots=True)
class _RandomBatches:
    """The default batches: random ids, ``2 + r`` samples on rank ``r`` (none on
    ``empty_rank``), the last feature first (so that a sharder must route by name)."""

    model: EmbeddingModel
    seed: int
    empty_rank: int | None = None

    def __call__(self, step: int, world_size: int) -> GlobalBatch:
        rows = list(self.model.feature_rows.items())
        return GlobalBatch.random(
            dict(rows[-1:] + rows[:-1]),
            [0 if r == self.empty_rank else 2 + r for r in range(world_size)],
            seed=self.seed + step,
            weighted=self.model.weighted,
            max_length=self.model.max_lengths or 3,
        )


def _batches_of(
    model: EmbeddingModel, batches: Batches, steps: range, world_size: int
) -> tuple[GlobalBatch, ...]:
    """``batches(step, world_size)`` for each step, checked here (a bad batch raises once, in
    this process, rather than on some ranks)."""
    out = []
    for step in steps:
        where = f"check_sharding: batches(step={step}, world_size={world_size})"
        batch = batches(step, world_size)
        if not isinstance(batch, GlobalBatch):
            raise TypeError(f"{where} returned {type(batch).__name__}, not a GlobalBatch")
        if len(batch.sizes) != world_size:
            raise ValueError(
                f"{where}: sizes {batch.sizes} has {len(batch.sizes)} entries, one per rank needed"
            )
        batch.check(model.feature_rows, weighted=model.weighted, where=where)
        out.append(batch)
    return tuple(out)


def _planned(
    model: EmbeddingModel,
    sharding_type: str,
    sharders: Sequence[ModuleSharder] | None,
    world_size: int,
    local_world_size: int | None,
) -> ShardingPlan:
    offered = list(sharders) if sharders is not None else load_sharder_registry().sharders()
    planner = EmbeddingShardingPlanner(
        Topology(world_size=world_size, compute_device="cpu", local_world_size=local_world_size),
        # Column splits of at least half the narrowest table: two column shards or more.
        constraints={
            t.name: ParameterConstraints(
                sharding_types=[sharding_type],
                min_partition=max(1, min(u.embedding_dim for u in model.tables) // 2),
            )
            for t in model.tables
        },
    )
    return planner.plan(model.build(_MODEL_SEED), offered)


@contextlib.contextmanager
def _pool_for(pool: WorkerPool | None, size: int) -> Iterator[WorkerPool]:
    if pool is not None:
        if pool.size < size:
            raise ValueError(f"check_sharding needs {size} workers; the pool has {pool.size}")
        yield pool
        return
    with WorkerPool(size) as own:
        yield own


def _round_trip(
    report: EquivalenceReport,
    tol: Tolerance,
    workers: WorkerPool,
    saved_run: RankRun,
    run: RankRun,
    ref: Reference,
    local_world_size: int | None,
) -> None:
    """The checkpoint ``saved_run`` saved, loaded into the unsharded module and by ``run``'s
    ranks; a load that fails is a difference too (naming the rank, with the error's last line)."""
    assert saved_run.checkpoint is not None
    saved = f"saved at world size {saved_run.world_size}"
    phase = f"{saved}, loaded unsharded"
    unsharded = run.model.build(_MODEL_SEED + 1)
    try:
        load(saved_run.checkpoint, unsharded)
    except CheckpointError as err:
        report.mismatches.append(Mismatch("checkpoint", phase, detail=f"(load failed: {err})"))
    else:
        compare_whole(report, tol, phase, Reference(unsharded).tables(), ref.tables())
    world = run.world_size
    phase = f"{saved}, loaded at world size {world}"
    try:
        results = workers.run(world, load_on_rank, local_world_size=local_world_size, run=run)
    except RankFailedError as err:
        failed = {rank: text.strip().splitlines()[-1] for rank, text in err.failures.items()}
    else:
        failed = {r: res.load_error for r, res in enumerate(results) if res.load_error is not None}
    if failed:
        for rank, error in failed.items():
            report.mismatches.append(
                Mismatch("checkpoint", phase, rank=rank, detail=f"(load failed: {error})")
            )
        return
    compare_outputs(report, tol, phase, results, [reference_outputs(ref, run)])
    compare_tables(report, tol, phase, results, *ref.tables())


def check_sharding(
    model: EmbeddingModel,
    *,
    plan: PlanForWorld | None = None,
    sharding_type: str | None = None,
    sharders: Sequence[ModuleSharder] | None = None,
    world_size: int = 2,
    reload_world_size: int | None = None,
    reload_plan: PlanForWorld | None = None,
    local_world_size: int | None = None,
    reload_local_world_size: int | None = None,
    steps: int = 3,
    empty_rank: int | None = None,
    batches: Batches | None = None,
    dense_optimizer: DenseOptimizer | None = None,
    pool: WorkerPool | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    raise_on_mismatch: bool = True,
) -> EquivalenceReport:
    """Train ``model`` sharded on ``world_size`` gloo processes and unsharded on the same global
    batches, and compare: every rank's outputs, the dense gradients, the per-id weights'
    gradients and (tables without a fused optimizer) the tables' gradients at every step, then
    every rank's shards of every table and fused optimizer state.

    The sharding is ``plan(world_size)`` (table -> ParameterSharding), or every table planned by
    the planner with ``sharding_type``. ``sharders`` default to those the plugin manager loads
    from the ``shardrec`` entry points (so a third party's installed sharder is found as the
    built-in ones are). With ``reload_world_size``, the sharded model is also saved after
    training, loaded into the unsharded module (weights and optimizer state compared), and
    loaded at ``reload_world_size`` under ``plan(reload_world_size)``, or ``reload_plan``'s
    (outputs and shards compared). ``local_world_size`` lays the ranks out as nodes
    (``LOCAL_WORLD_SIZE``). ``pool``: workers to run on (default: a pool of its own).

    The batches are random (``2 + r`` samples on rank ``r``; none on ``empty_rank``), or
    ``batches(step, world_size)``'s: called here for steps ``0..steps-1`` at ``world_size``
    (and step ``steps`` at ``reload_world_size``), checked against the model, and sent to the
    ranks. ``dense_optimizer(parameters)`` makes the torch optimizer of what gets a gradient
    (the dense head; the tables, without a fused optimizer) on both sides (default: SGD at
    0.05); it travels to the ranks, so it must pickle (a module-level function or a
    ``functools.partial`` of one, such as ``partial(torch.optim.SGD, lr=0.1, momentum=0.9)``).

    Raises :class:`EquivalenceError` naming each difference (what, table, rank, step, max abs
    diff) unless ``raise_on_mismatch`` is False; returns the report.
    """
    if (plan is None) == (sharding_type is None):
        raise ValueError("check_sharding: give exactly one of plan= and sharding_type=")
    if steps < 1:
        raise ValueError(f"check_sharding: steps must be >= 1, got {steps}")
    if batches is not None and empty_rank is not None:
        raise ValueError(
            "check_sharding: give empty_rank= or batches=, not both (give the empty rank"
            " a size of 0 in your batches)"
        )
    optimizer = dense_optimizer if dense_optimizer is not None else DEFAULT_DENSE_OPTIMIZER
    try:
        pickle.dumps(optimizer)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise TypeError(
            "check_sharding: dense_optimizer must pickle (a module-level function or a"
            f" functools.partial of one): {err}"
        ) from err

    def plan_at(world: int, local: int | None, reloading: bool = False) -> ShardingPlan:
        chosen = reload_plan if reloading and reload_plan is not None else plan
        if chosen is not None:
            return ShardingPlan({EMBEDDING_FQN: dict(chosen(world))})
        assert sharding_type is not None
        return _planned(model, sharding_type, sharders, world, local)

    kind = "EmbeddingBagCollection" if model.pooled else "EmbeddingCollection"
    description = f"{sharding_type or 'plan'} of an {kind} at world size {world_size}"
    report = EquivalenceReport(description)
    tol = Tolerance(atol, rtol)
    train_batches = batches or _RandomBatches(model, _BATCH_SEED, empty_rank)
    run = RankRun(
        model=model,
        plan=plan_at(world_size, local_world_size),
        sharders=sharders,
        world_size=world_size,
        batches=_batches_of(model, train_batches, range(steps), world_size),
        model_seed=_MODEL_SEED,
        steps=steps,
        dense_optimizer=optimizer,
    )
    again: RankRun | None = None
    if reload_world_size is not None:
        # The batch after training (default: other random numbers), at the new world size.
        reload_batches, first = batches, steps
        if reload_batches is None:
            reload_batches, first = _RandomBatches(model, _RELOAD_BATCH_SEED), 0
        again = dataclasses.replace(
            run,
            plan=plan_at(reload_world_size, reload_local_world_size, reloading=True),
            world_size=reload_world_size,
            batches=_batches_of(model, reload_batches, range(first, first + 1), reload_world_size),
            model_seed=_MODEL_SEED + 1,
            steps=0,
        )
    phase = f"trained at world size {world_size}"
    with (
        tempfile.TemporaryDirectory(prefix="shardrec-check-") as tmp,
        _pool_for(pool, max(world_size, reload_world_size or 1)) as workers,
    ):
        if again is not None:
            run = dataclasses.replace(run, checkpoint=tmp)
            again = dataclasses.replace(again, checkpoint=tmp)
        results = workers.run(world_size, train_on_rank, local_world_size=local_world_size, run=run)
        ref = train_reference(run)
        compare_outputs(report, tol, phase, results, ref.outputs)
        compare_steps(report, tol, phase, results, ref.dense_grads, ref.weight_grads)
        compare_table_grads(report, tol, phase, results, ref.table_grads)
        compare_tables(report, tol, phase, results, *ref.tables())
        if again is not None:
            _round_trip(report, tol, workers, run, again, ref, reload_local_world_size)
    if raise_on_mismatch and not report.ok:
        raise EquivalenceError(report)
    return report
