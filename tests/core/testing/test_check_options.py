"""``check_sharding``'s own batches and dense optimizer, and the tables' gradients it compares
when the tables have no fused optimizer."""

from __future__ import annotations

import functools
from typing import cast

import pytest
import torch

from shardrec.distributed import ParameterSharding
from shardrec.distributed.sharding_plan import row_wise
from shardrec.testing import EmbeddingModel, GlobalBatch, WorkerPool, check_sharding

from .test_check_sharding import TABLES, CopySharder

pytestmark = pytest.mark.multiprocess

PLAIN = EmbeddingModel(tables=TABLES, fused_params=None)
MOMENTUM = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1)
FROZEN = functools.partial(torch.optim.SGD, lr=0.0)


def low_rows(step: int, world_size: int) -> GlobalBatch:
    """Three samples (all on rank 0 at world size 2); f0 reads only rows 0..2, so that the
    second row block of t0 (rows 4..6 at 2 ranks) gets no ids at all."""
    return GlobalBatch(
        keys=["f1", "f0"],
        lengths=torch.tensor([[1, 2, 0], [1, 1, 1]]),
        ids=[torch.tensor([4, step % 5, 0]), torch.tensor([0, 1, step % 3])],
        weights=None,
        sizes=[3] + [0] * (world_size - 1),
    )


def row_wise_plan(world: int) -> dict[str, ParameterSharding]:
    return {t.name: row_wise(t.num_embeddings, t.embedding_dim, world) for t in TABLES}


def test_own_batches_and_optimizer_on_plain_row_wise_tables(dist_pool: WorkerPool) -> None:
    # Momentum and weight decay on plain tables: a shard that got no gradient where the
    # unsharded table gets a zero one would also be stepped differently.
    report = check_sharding(
        PLAIN,
        plan=row_wise_plan,
        world_size=2,
        batches=low_rows,
        dense_optimizer=MOMENTUM,
        reload_world_size=3,
        pool=dist_pool,
    )
    grads = [c for c in report.checked if c.startswith("what table gradient")]
    # 3 steps x (t0: 2 row blocks; t1: 2 row blocks).
    assert len(grads) == 3 * 4, grads


def test_a_wrong_table_gradient_is_named(dist_pool: WorkerPool) -> None:
    # With the dense optimizer frozen, the doubled gradient changes nothing else.
    report = check_sharding(
        PLAIN,
        sharding_type="whole_copy",
        sharders=[CopySharder({}, grads={"t1": 2.0})],
        world_size=1,
        dense_optimizer=FROZEN,
        pool=dist_pool,
        raise_on_mismatch=False,
    )
    assert {(m.what, m.table, m.rank) for m in report.mismatches} == {("table gradient", "t1", 0)}
    assert [m.step for m in report.mismatches] == [0, 1, 2]
    assert "table gradient differs (trained at world size 1; table t1, rank 0, step 0)" in str(
        report
    )
    # With the default optimizer (SGD at 0.05) the table trains away from the unsharded one.
    report = check_sharding(
        PLAIN,
        sharding_type="whole_copy",
        sharders=[CopySharder({}, grads={"t1": 2.0})],
        world_size=1,
        pool=dist_pool,
        raise_on_mismatch=False,
    )
    assert {m.table for m in report.mismatches if m.what == "weight"} == {"t1"}


def test_a_table_without_gradient_is_named(dist_pool: WorkerPool) -> None:
    report = check_sharding(
        PLAIN,
        sharding_type="whole_copy",
        sharders=[CopySharder({}, grads={"t0": None})],
        world_size=1,
        dense_optimizer=FROZEN,
        pool=dist_pool,
        raise_on_mismatch=False,
    )
    assert {(m.what, m.table, m.detail) for m in report.mismatches} == {
        ("table gradient", "t0", "(none: the shard got no gradient)")
    }


def _batch(**change: object) -> GlobalBatch:
    fields = {
        "keys": ["f0", "f1"],
        "lengths": torch.tensor([[1, 1], [1, 0]]),
        "ids": [torch.tensor([0, 6]), torch.tensor([4])],
        "weights": None,
        "sizes": [1, 1],
    }
    return GlobalBatch(**{**fields, **change})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (_batch(sizes=[2]), r"sizes \[2\] has 1 entries, one per rank needed"),
        (_batch(sizes=[2, -1]), "negative number of samples"),
        (_batch(ids=[torch.tensor([0, 7]), torch.tensor([4])]), "ids 0..7; its table has 7"),
        (_batch(ids=[torch.tensor([0]), torch.tensor([4])]), "'f0' has 1 ids; its lengths say 2"),
        (_batch(keys=["f0", "f9"]), r"missing \['f1'\], unknown \['f9'\]"),
        (_batch(lengths=torch.tensor([[1, 1]])), r"lengths must be \[2, 2\]"),
        (_batch(weights=[torch.ones(2), torch.ones(1)]), "the model takes no per-id weights"),
        ("not a batch", "returned str, not a GlobalBatch"),
    ],
)
def test_a_bad_batch_is_refused_before_any_rank_runs(batch: object, message: str) -> None:
    # No pool: the batches are checked in this process first.
    with pytest.raises((ValueError, TypeError), match=message) as caught:
        check_sharding(
            PLAIN,
            plan=row_wise_plan,
            world_size=2,
            steps=2,
            batches=lambda step, world: cast(GlobalBatch, batch),  # a wrong type on purpose
        )
    assert "check_sharding: batches(step=0, world_size=2)" in str(caught.value)


def test_options_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="give empty_rank= or batches=, not both"):
        check_sharding(PLAIN, plan=row_wise_plan, batches=low_rows, empty_rank=1)
    with pytest.raises(TypeError, match="dense_optimizer must pickle"):
        check_sharding(
            PLAIN, plan=row_wise_plan, dense_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)
        )
