"""What a sharding check runs on each rank: train under a plan, or load a checkpoint; report the
outputs, gradients and this rank's shards of every table."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from shardrec.distributed import DistributedModelParallel, ModuleSharder, ShardingEnv, ShardingPlan
from shardrec.distributed.checkpoint import load, save
from shardrec.distributed.sharding import ReplicatedModule
from shardrec.testing._batches import GlobalBatch
from shardrec.testing._model import EMBEDDING_FQN, EmbeddingModel

__all__ = [
    "DEFAULT_DENSE_OPTIMIZER",
    "DenseOptimizer",
    "Held",
    "RankResult",
    "RankRun",
    "load_on_rank",
    "train_on_rank",
]

Held = list[tuple[torch.Tensor, tuple[int, ...]]]
"""Shards this rank holds of one tensor: a copy of each, with its offsets in the whole."""

GradHeld = list[tuple[torch.Tensor | None, tuple[int, ...]]]
"""Each shard's gradient at one step (None: the shard got none), with its offsets."""

DenseOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
"""The parameters that get a gradient -> the torch optimizer that steps them."""

DEFAULT_DENSE_OPTIMIZER: DenseOptimizer = functools.partial(torch.optim.SGD, lr=0.05)
"""Plain SGD at learning rate 0.05."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankRun:
    """One sharded run: the model, the plan over its ``emb`` module, the sharders (None: the
    plugin registry's), the global batch of each step (made once, by the caller) and the
    optimizer of what gets a gradient."""

    model: EmbeddingModel
    plan: ShardingPlan
    sharders: Sequence[ModuleSharder] | None
    world_size: int
    batches: Sequence[GlobalBatch]
    model_seed: int
    steps: int = 0
    dense_optimizer: DenseOptimizer = DEFAULT_DENSE_OPTIMIZER
    checkpoint: str | None = None

    def batch(self, step: int) -> GlobalBatch:
        return self.batches[step]


@dataclass(slots=True)
class RankResult:
    """Per step: the output rows, the dense head's gradient (as a sum over ranks), the per-id
    weights' gradient and the gradient of each table shard that is a trainable parameter; at the
    end, each table's shards and whether they are replicas."""

    outputs: list[torch.Tensor] = field(default_factory=list)
    dense_grads: list[torch.Tensor] = field(default_factory=list)
    weight_grads: list[torch.Tensor] = field(default_factory=list)
    table_grads: list[dict[str, GradHeld]] = field(default_factory=list)
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


def _shard_parameters(
    dmp: DistributedModelParallel, trainable: Sequence[nn.Parameter]
) -> list[tuple[str, tuple[int, ...], nn.Parameter]]:
    """The table shards whose tensor is a trainable parameter's storage (plain tables, without
    a fused optimizer), as (table, offsets, parameter)."""
    by_storage = {(p.data_ptr(), tuple(p.shape)): p for p in trainable}
    out = []
    for table, shards in dmp.local_table_shards().get(EMBEDDING_FQN, {}).items():
        for s in shards.weight:
            p = by_storage.get((s.tensor.data_ptr(), tuple(s.tensor.shape)))
            if p is not None:
                out.append((table, s.offsets, p))
    return out


def train_on_rank(env: ShardingEnv, run: RankRun) -> RankResult:
    """``run.steps`` steps of ``run.dense_optimizer`` on what has a gradient (the dense head;
    tables without a fused optimizer), gradients averaged by DDP scaled back to the sum over
    ranks that the reference's loss gives; fused tables update themselves in backward. Then
    save if asked."""
    dmp = _build(env, run)
    head = dmp.module.get_submodule("dense")
    assert isinstance(head, torch.nn.Linear)
    trainable = [p for p in dmp.parameters() if p.requires_grad]
    sharded = _sharded_parameters(dmp)
    averaged = [p for p in trainable if id(p) not in sharded]
    table_params = _shard_parameters(dmp, trainable)
    opt = run.dense_optimizer(trainable) if trainable else None
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
        grads: dict[str, GradHeld] = {}
        for table, offsets, p in table_params:
            grad = None if p.grad is None else p.grad.detach().to_dense().clone()
            grads.setdefault(table, []).append((grad, offsets))
        result.table_grads.append(grads)
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
