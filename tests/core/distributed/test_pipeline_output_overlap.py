"""The pipelined loop leaves every sharded module's output distribution in flight before the
forward waits for any, and still trains exactly what the plain loop trains.

Two sharded modules ``a`` and ``b`` are called one after the other, with dense work between. The
collectives go through a latency-injecting group that also records when each is issued; the
model records when each module returned (its rows were waited for). With the pipeline, ``b``'s
output all-to-all is issued before ``a`` returns, so ``b``'s rows travel while ``a``'s are waited
for and the dense work between runs; in the plain loop it is issued after. A model that calls
``b`` under ``torch.no_grad()`` keeps ``b``'s lookup where it is called (looking it up earlier,
with grad, would train ``b``'s table, which the plain loop leaves alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.latency import DelayedProcessGroup
from shardrec.distributed.sharding_plan import row_wise, table_wise
from shardrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from shardrec.testing import GlobalBatch

pytestmark = pytest.mark.multiprocess

WORLD = 4  # the whole pool: a new group is made by every rank of the default group
STEPS = 3
DIM = 4
BACKEND = "shardrec_recording"

EVENTS: list[str] = []  # this worker's: "out" (a float all-to-all issued), "a", "b", "step"


class RecordingGroup(DelayedProcessGroup):
    """The latency simulator's group, noting each float all-to-all or reduce-scatter (an output
    distribution's rows or their gradient; ids and sizes are integers) as it is issued."""

    def alltoall_base(self, *args: Any) -> dist.Work:
        if args[1].is_floating_point():
            EVENTS.append("out")
        return super().alltoall_base(*args)

    def _reduce_scatter_base(self, *args: Any) -> dist.Work:
        if args[1].is_floating_point():
            EVENTS.append("out")
        return super()._reduce_scatter_base(*args)


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> RecordingGroup:
    return RecordingGroup(dist.ProcessGroupGloo(store, rank, size, timeout), rank, size)


def recording_group(latency_s: float) -> RecordingGroup:
    if not hasattr(dist.Backend, BACKEND.upper()):
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
    group = dist.new_group(None, backend=BACKEND)
    assert isinstance(group, RecordingGroup)
    group.latency_s = latency_s
    return group


@dataclass(frozen=True, slots=True)
class Batch:
    a: KeyedJaggedTensor
    b: KeyedJaggedTensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self


def tables(name: str, rows: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=DIM, feature_names=[name])
    ]


class TwoTowers(nn.Module):
    def __init__(self, frozen_b: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        fused = {"optimizer": "rowwise_adagrad", "learning_rate": 0.1}
        self.a = EmbeddingBagCollection(tables=tables("fa", 7), fused_params=fused)
        self.b = EmbeddingBagCollection(tables=tables("fb", 9), fused_params=fused)
        self.dense_a = nn.Linear(DIM, DIM)
        self.head = nn.Linear(2 * DIM, 1)
        self.frozen_b = frozen_b

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ra = self.a(batch.a).values()
        EVENTS.append("a")
        ha = torch.relu(self.dense_a(ra))  # dense work that b's rows are not needed for
        if self.frozen_b:
            with torch.no_grad():
                rb = self.b(batch.b).values()
        else:
            rb = self.b(batch.b).values()
        EVENTS.append("b")
        out = self.head(torch.cat([ha, torch.tanh(rb)], dim=1))
        return out.square().sum(), out.detach()


def batches(rank: int) -> list[Batch]:
    sizes = [2 + r for r in range(WORLD)]
    return [
        Batch(
            GlobalBatch.random({"fa": 7}, sizes, seed=300 + step).kjt(rank),
            GlobalBatch.random({"fb": 9}, sizes, seed=400 + step).kjt(rank),
        )
        for step in range(STEPS)
    ]


def train(env: ShardingEnv, pipelined: bool, frozen_b: bool) -> dict[str, Any]:
    model = TwoTowers(frozen_b)
    plan = ShardingPlan({"a": {"fa": row_wise(7, DIM, WORLD)}, "b": {"fb": table_wise(1, 9, DIM)}})
    dmp = DistributedModelParallel(model, env=env, plan=plan)
    opt = torch.optim.SGD([*model.dense_a.parameters(), *model.head.parameters()], lr=0.05)
    cls = TrainPipelineSparseDist if pipelined else TrainPipelineBase
    loop: Any = cls(dmp, opt, torch.device("cpu"))
    it = iter(batches(env.rank))
    outputs = []
    EVENTS.clear()
    for _ in range(STEPS):
        EVENTS.append("step")
        outputs.append(loop.progress(it))
    steps = _split(list(EVENTS))
    state = {
        f"{fqn}.{table}.{part}": t.tensor.detach().clone()
        for fqn, held in dmp.local_table_shards().items()
        for table, ts in held.items()
        for part, t in [("w", s) for s in ts.weight]
        + [(name, s) for name, ss in ts.optimizer_state.items() for s in ss]
    }
    for name, p in model.named_parameters():
        if "dense" in name or "head" in name:
            state[name] = p.detach().clone()
    return {"outputs": outputs, "state": state, "steps": steps}


def _split(events: list[str]) -> list[dict[str, int]]:
    """Per step: float all-to-alls issued before ``a`` returned, and between ``a`` and ``b``."""
    found = []
    for step in " ".join(events).split("step")[1:]:
        words = step.split()
        ia, ib = words.index("a"), words.index("b")
        found.append({"before_a": words[:ia].count("out"), "a_to_b": words[ia:ib].count("out")})
    return found


def case_overlap(env: ShardingEnv, frozen_b: bool) -> dict[str, Any]:
    group = recording_group(latency_s=0.005)
    delayed = ShardingEnv.from_process_group(group)
    return {
        "plain": train(delayed, pipelined=False, frozen_b=frozen_b),
        "piped": train(delayed, pipelined=True, frozen_b=frozen_b),
    }


@pytest.mark.parametrize("frozen_b", [False, True], ids=["b_with_grad", "b_under_no_grad"])
def test_output_distributions_overlap_and_train_as_the_plain_loop(
    dist_pool: Any, frozen_b: bool
) -> None:
    for rank, r in enumerate(dist_pool.run(WORLD, case_overlap, frozen_b=frozen_b)):
        plain, piped = r["plain"], r["piped"]
        for step, (x, y) in enumerate(zip(plain["outputs"], piped["outputs"], strict=True)):
            assert torch.equal(x, y), f"rank {rank} output of step {step}"
        assert plain["state"].keys() == piped["state"].keys()
        for key, value in plain["state"].items():
            assert torch.equal(value, piped["state"][key]), f"rank {rank}: {key} differs"
        # The plain loop: a's rows are sent and waited for, then b's are sent.
        n_a, n_b = plain["steps"][0]["before_a"], plain["steps"][0]["a_to_b"]
        assert n_a >= 1
        assert n_b >= 1
        assert all(counts == plain["steps"][0] for counts in plain["steps"])
        # The first pipelined step runs unpipelined (it learns what to pipeline).
        assert piped["steps"][0] == plain["steps"][0]
        for counts in piped["steps"][1:]:
            if frozen_b:  # b is looked up where it is called, under no_grad, as in the plain loop
                assert counts == {"before_a": n_a, "a_to_b": n_b}
            else:  # b's rows were sent before a's were waited for
                assert counts == {"before_a": n_a + n_b, "a_to_b": 0}
