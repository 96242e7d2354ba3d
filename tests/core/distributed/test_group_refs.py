"""A process group destroyed while a sharded model, its env, its node groups and its outputs are
still held is ended at once: nothing of shardrec keeps it alive (``shardrec.distributed.group_ref``
says why that matters: a gloo group that outlives ``destroy_process_group`` can abort the process
at exit). Using it afterwards raises ``GroupDestroyedError`` naming who used it."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
)
from shardrec.distributed.group_ref import GroupDestroyedError
from shardrec.distributed.node_groups import node_groups

pytestmark = pytest.mark.multiprocess


def _error(use: Any) -> str:
    try:
        use()
    except GroupDestroyedError as error:
        return str(error)
    return "no error"


def case_destroyed_group_is_released(env: ShardingEnv) -> dict[str, Any]:
    # A group of its own, made by every rank of the pool's default group (torch requires it).
    group = dist.new_group(list(range(env.world_size)))
    ref = weakref.ref(group)
    mine = ShardingEnv.from_process_group(group)
    tables = [
        EmbeddingBagConfig(name=t, embedding_dim=8, num_embeddings=16, feature_names=[f"f_{t}"])
        for t in ("a", "b")
    ]
    ebc = EmbeddingBagCollection(tables=tables)
    # Table-wise, so that the output crosses ranks (an all-to-all) and no DDP is made (DDP keeps
    # its group until exit: test_exit_clean covers it).
    shard = {
        t: ParameterSharding(sharding_type="table_wise", compute_kernel="fused", ranks=(r,))
        for r, t in enumerate("ab")
    }
    plan = ShardingPlan({"": shard})
    model = DistributedModelParallel(ebc, env=mine, device=torch.device("cpu"), plan=plan)
    kjt = KeyedJaggedTensor(
        keys=["f_a", "f_b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])
    )
    pooled = model(kjt).values()  # its autograd record holds the all-to-all's group
    nodes = node_groups(mine, local_world_size=env.world_size)  # one node: intra is the group
    assert nodes.intra is group
    del group
    dist.destroy_process_group(ref())
    return {
        "alive": ref() is not None,
        "env": _error(lambda: mine.pg),
        "nodes": _error(lambda: nodes.intra),
        "backward": _error(lambda: pooled.sum().backward()),
        "repr": repr(mine),
        "model_held": model is not None,
    }


def test_a_destroyed_group_is_not_kept_alive_by_the_model(dist_pool: Any) -> None:
    for rank, got in enumerate(dist_pool.run(4, case_destroyed_group_is_released)):
        assert got["model_held"]
        assert not got["alive"], f"rank {rank}: something still holds the destroyed group"
        assert got["env"].startswith(f"ShardingEnv (rank {rank} of 4): its process group has been")
        assert "destroy_process_group" in got["env"]
        assert got["nodes"].startswith(f"NodeGroups (rank {rank}): its process group has been")
        assert got["backward"].startswith("the gradient of a collective: its process group")
        assert got["repr"] == f"ShardingEnv(world_size=4, rank={rank}, pg=<destroyed ProcessGroup>)"


def case_delayed_group_ends_its_gloo_group(env: ShardingEnv) -> dict[str, Any]:
    from shardrec.distributed.latency import new_delayed_group

    group = new_delayed_group(latency_s=0.2)
    assert group is not None
    gloo = weakref.ref(group._inner)
    votes = torch.ones(3)
    work = group.allreduce([votes])  # still being delayed when the group is shut down
    # What destroy_process_group calls on every group (torch cannot destroy a Python group alone,
    # by name, and the pool's default group must stay).
    group.shutdown()
    return {
        "completed": work.is_completed(),
        "votes": votes.tolist(),
        "gloo_alive": gloo() is not None,
        "after": _error(lambda: group.allreduce([votes])),
    }


def test_shutting_a_delayed_group_waits_for_its_work_and_ends_gloo(dist_pool: Any) -> None:
    for got in dist_pool.run(4, case_delayed_group_ends_its_gloo_group):
        assert got["completed"]
        assert got["votes"] == [4.0, 4.0, 4.0]
        assert not got["gloo_alive"]
        assert got["after"].startswith("DelayedProcessGroup: it has been destroyed")
