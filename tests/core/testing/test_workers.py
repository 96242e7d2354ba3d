"""The kit's worker pool: results in rank order, and every way a case can go wrong on some rank
(it raises, its process dies, it hangs) reported in the parent, naming the rank."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from shardrec.distributed import ShardingEnv
from shardrec.testing import RankFailedError, RankTimeoutError, WorkerPool, run_ranks

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def small_pool() -> Iterator[WorkerPool]:
    """A pool of its own: the failures below kill it (the shared one stays warm)."""
    with WorkerPool(
        2, preload=[os.path.join(os.path.dirname(__file__), "..", "..", "conftest.py")]
    ) as pool:
        yield pool


def case_sum_of_ranks(env: ShardingEnv, scale: int) -> tuple[int, int]:
    t = torch.tensor([env.rank + 1])
    dist.all_reduce(t, group=env.pg)
    return env.rank, int(t) * scale


def case_raises_on_rank_1(env: ShardingEnv) -> None:
    if env.rank == 1:
        raise ValueError("table 'tx' is not where rank 1 expected it")
    dist.barrier(group=env.pg)  # rank 0 waits for a rank that will never come


def case_dies_on_rank_1(env: ShardingEnv) -> None:
    if env.rank == 1:
        os._exit(3)
    dist.barrier(group=env.pg)


def case_hangs_on_rank_1(env: ShardingEnv) -> None:
    if env.rank == 1:
        time.sleep(600)
    dist.barrier(group=env.pg)


def case_local_world_size(env: ShardingEnv) -> str | None:
    return os.environ.get("LOCAL_WORLD_SIZE")


def test_results_come_back_in_rank_order(dist_pool: WorkerPool) -> None:
    assert dist_pool.run(3, case_sum_of_ranks, scale=10) == [(0, 60), (1, 60), (2, 60)]
    assert dist_pool.run(2, case_sum_of_ranks, scale=1) == [(0, 3), (1, 3)]


def test_simulated_nodes_set_local_world_size_for_the_case_only(dist_pool: WorkerPool) -> None:
    assert dist_pool.run(4, case_local_world_size, local_world_size=2) == ["2"] * 4
    assert dist_pool.run(4, case_local_world_size) == [None] * 4
    with pytest.raises(ValueError, match="local_world_size=3 must be >= 1 and divide 4"):
        dist_pool.run(4, case_local_world_size, local_world_size=3)


def test_a_rank_that_raises_is_named_with_its_traceback(small_pool: WorkerPool) -> None:
    with pytest.raises(RankFailedError) as caught:
        small_pool.run(2, case_raises_on_rank_1, timeout_s=60)
    assert list(caught.value.failures) == [1]
    message = str(caught.value)
    assert "case_raises_on_rank_1 failed on rank 1" in message
    assert "--- rank 1 ---" in message
    assert "Traceback" in message
    assert "ValueError: table 'tx' is not where rank 1 expected it" in message
    # The pool starts afresh: rank 0, left waiting in the barrier, does not poison the next case.
    assert not small_pool.started
    assert small_pool.run(2, case_sum_of_ranks, scale=1) == [(0, 3), (1, 3)]


def test_a_rank_that_dies_is_named_with_its_exit_status() -> None:
    # Through run_ranks: its own two workers, stopped after the case (here, after the failure).
    with pytest.raises(RankFailedError) as caught:
        run_ranks(2, case_dies_on_rank_1, timeout_s=60)
    # Rank 0 may also report the broken connection in its barrier.
    assert caught.value.failures[1] == "worker process exited with status 3"
    assert "--- rank 1 ---\nworker process exited with status 3" in str(caught.value)


def test_a_hung_rank_times_out_naming_the_silent_ranks(small_pool: WorkerPool) -> None:
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"rank 0, 1 gave no answer in 2 s") as caught:
        small_pool.run(2, case_hangs_on_rank_1, timeout_s=2)
    assert caught.value.ranks == [0, 1]
    assert time.monotonic() - start < 30


def test_world_size_outside_the_pool_is_refused(dist_pool: WorkerPool) -> None:
    with pytest.raises(ValueError, match=r"world_size must be in 1\.\.4, got 5"):
        dist_pool.run(5, case_sum_of_ranks, scale=1)
