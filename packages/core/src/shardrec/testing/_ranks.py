"""What a sharding check runs on each rank: train under a plan, or load a checkpoint; report the
outputs, gradients and this rank's shards of every table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shardrec.distributed import DistributedModelParallel, ModuleSharder, ShardingEnv, ShardingPlan
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.sharding import ReplicatedModule
from shardrec.testing._batches import GlobalBatch
from shardrec.testing._model import EMBEDDING_FQN, EmbeddingModel

__all__ = ["Held", "RankResult", "RankRun", "load_on_rank", "train_on_rank"]

Held = list[tuple[torch.Tensor, tuple[int, ...]]]
"""Shards this rank holds of one tensor: a copy of each, with its offsets in the whole."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankRun:
    """One sharded run: the model, the plan over its ``emb`` module, the sharders (None: the
    plugin registry's), and the batches (``sizes`` samples per rank, seeds from ``batch_seed``)."""

    model: EmbeddingModel
    plan: ShardingPlan
    sharders: Sequence[ModuleSharder] | None
    sizes: list[int]
    model_seed: int
    batch_seed: int
    steps: int = 0
    learning_rate: float = 0.05
    checkpoint: str | None = None

    def batch(self, step: int) -> GlobalBatch:
        # The last feature first: the KJT's keys are not in the module's order, so that a
        # sharder must route by name.
        rows = list(self.model.feature_rows.items())
        return GlobalBatch.random(
            dict(rows[-1:] + rows[:-1]),
            self.sizes,
            seed=self.batch_seed + step,
            weighted=self.model.weighted,
            max_length=self.model.max_lengths or 3,
        )


@dataclass(slots=True)
class RankResult:
    """Per step: the output rows, the dense head's gradient (as a sum over ranks) and the per-id
    weights' gradient; at the end, each table's shards and whether they are replicas."""

    outputs: list[torch.Tensor] = field(default_factory=list)
    dense_grads: list[torch.Tensor] = field(default_factory=list)
    weight_grads: list[torch.Tensor] = field(default_factory=list)
    weights: dict[str, Held] = field(default_factory=dict)
    states: dict[str, dict[str, Held]] = field(default_factory=dict)
    replicated: dict[str, bool] = field(default_factory=dict)
    load_error: str | None = None


def _build(env: ShardingEnv, run: RankRun) -> DistributedModelParallel:
    sharders = list(run.sharders) if run.sharders is not None else None
    return DistributedModelParallel(
        run.model.build(run.model_seed), env=env, plan=run.plan, sharders=sharders
    )


def _held(dmp: DistributedModelParallel, result: RankResult) -> None:
    for table, shards in dmp.local_table_shards().get(EMBEDDING_FQN, {}).items():
        result.weights[table] = [(s.tensor.detach().clone(), s.offsets) for s in shards.weight]
        result.states[table] = {
            name: [(s.tensor.detach().clone(), s.offsets) for s in held]
            for name, held in shards.optimizer_state.items()
        }
        result.replicated[table] = shards.replicated


def _sharded_parameters(dmp: DistributedModelParallel) -> set[int]:
    """The parameters of sharded tables: their gradient is the sum over ranks already (DDP
    averages the others: dense layers, and the replicas of a :class:`ReplicatedModule`)."""
    out: set[int] = set()
    for _, module in dmp.named_sharded_modules():
        replicas = {
            name
            for name, sub in module.named_modules()
            if isinstance(sub, ReplicatedModule) and sub.replicated
        }
        for name, p in module.named_parameters():
            owners = name.split(".")[:-1]
            paths = {".".join(owners[:i]) for i in range(len(owners) + 1)}
            if not paths & replicas:
                out.add(id(p))
    return out


def train_on_rank(env: ShardingEnv, run: RankRun) -> RankResult:
    """``run.steps`` steps of plain SGD on what has a gradient (the dense head; tables without a
    fused optimizer), gradients averaged by DDP scaled back to the sum over ranks that the
    reference's loss gives; fused tables update themselves in backward. Then save if asked."""
    dmp = _build(env, run)
    head = dmp.module.get_submodule("dense")
    assert isinstance(head, torch.nn.Linear)
    trainable = [p for p in dmp.parameters() if p.requires_grad]
    sharded = _sharded_parameters(dmp)
    averaged = [p for p in trainable if id(p) not in sharded]
    opt = torch.optim.SGD(trainable, lr=run.learning_rate) if trainable else None
    result = RankResult()
    for step in range(run.steps):
        kjt = run.batch(step).kjt(env.rank, weights_need_grad=run.model.weighted)
        rows, loss = dmp(kjt)
        loss.backward()
        with torch.no_grad():
            for p in averaged:
                if p.grad is not None:
                    p.grad.mul_(env.world_size)
        result.outputs.append(rows.detach().clone())
        assert head.weight.grad is not None
        result.dense_grads.append(head.weight.grad.detach().clone())
        weights = kjt.weights_or_none()
        if weights is not None and weights.grad is not None:
            result.weight_grads.append(weights.grad.clone())
        if opt is not None:
            opt.step()
            opt.zero_grad()
    _held(dmp, result)
    if run.checkpoint is not None:
        save(run.checkpoint, dmp, step=run.steps, pg=env.pg)
    return result


def load_on_rank(env: ShardingEnv, run: RankRun) -> RankResult:
    """A fresh model (other initial numbers) sharded by ``run.plan`` loads ``run.checkpoint``;
    its output on batch ``run.batch(0)`` and its shards, or why the load failed."""
    assert run.checkpoint is not None
    dmp = _build(env, run)
    result = RankResult()
    try:
        load(run.checkpoint, dmp, pg=env.pg)
    except Exception as err:
        # Reported, not raised: the workers stay up (a load refuses a bad checkpoint on every
        # rank; a rank that went on alone would time out in the forward's collectives instead).
        result.load_error = f"{type(err).__name__}: {err}"
        return result
    with torch.no_grad():
        rows, _ = dmp(run.batch(0).kjt(env.rank))
    result.outputs.append(rows.clone())
    _held(dmp, result)
    return result
