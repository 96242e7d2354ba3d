"""Building the sharded model of a run: the DLRM, its plan, DistributedModelParallel, the
optimizers.

The embedding tables train with a fused optimizer (applied inside backward, on the rows a batch
touched), the dense layers with the torch optimizer of the same name. Tables that the plan makes
data-parallel keep plain parameters with ``.grad`` and join the dense optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardrec_dlrm.config import ModelConfig, OptimizerName, TrainConfig
from shardrec_dlrm.model.build import build_dlrm
from shardrec_dlrm.parallel import ParallelState
from shardrec_dlrm.planning import PlanRequest, discover_sharders, plan_model

#: ``--optimizer`` -> the fused optimizer of the embedding tables (shardrec's ``fused_params``).
FUSED_OPTIMIZER: dict[str, str] = {
    "sgd": "sgd",
    "adagrad": "exact_adagrad",
    "rowwise_adagrad": "rowwise_adagrad",
    "adam": "adam",
}


@dataclass(slots=True)
class ShardedRun:
    """The model of a run, ready to train: call ``model(dense, kjt, labels) -> (loss, logits)``."""

    model: nn.Module
    dense_optimizer: torch.optim.Optimizer
    fused_lr: Callable[[float], None]
    plan_text: str
    extra: dict[str, Any] = field(default_factory=dict)

    def set_lr(self, lr: float) -> None:
        for group in self.dense_optimizer.param_groups:
            group["lr"] = lr
        self.fused_lr(lr)


def fused_params(optimizer: OptimizerName, lr: float, eps: float) -> dict[str, object]:
    return {"optimizer": FUSED_OPTIMIZER[optimizer], "learning_rate": lr, "eps": eps}


def dense_optimizer_for(
    params: list[nn.Parameter], optimizer: OptimizerName, lr: float, eps: float
) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer in ("adagrad", "rowwise_adagrad"):
        # torch has no row-wise Adagrad: dense layers use the exact one.
        return torch.optim.Adagrad(params, lr=lr, eps=eps)
    return torch.optim.Adam(params, lr=lr, eps=eps)


def shard_model(config: TrainConfig, state: ParallelState) -> ShardedRun:
    """Builds the model on the meta device, plans it, and shards it over the run's processes."""
    from shardrec.distributed import DistributedModelParallel

    meta = torch.device("meta")
    model = build_dlrm(
        config.model,
        embedding_device=meta,
        dense_device=state.device,
        fused_params=fused_params(config.optimizer, config.learning_rate, config.eps),
    )
    request = PlanRequest(
        world_size=state.world_size,
        compute_device=state.device.type,
        batch_size=config.batch_size,
        sharding=config.sharding,
        optimizer=config.optimizer,
        local_world_size=_local_world_size(state),
    )
    sharders = discover_sharders()
    plan, report = plan_model(model, request, sharders, collective=True)
    sharded = DistributedModelParallel(model, device=state.device, plan=plan, sharders=sharders)
    dense = list(_trainable_dense(sharded))
    return ShardedRun(
        model=sharded,
        dense_optimizer=dense_optimizer_for(
            dense, config.optimizer, config.learning_rate, config.eps
        ),
        fused_lr=_fused_lr_setter(sharded),
        plan_text=report,
    )


def _local_world_size(state: ParallelState) -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", state.world_size))


def _trainable_dense(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters a torch optimizer must step: those that get a ``.grad`` (fused tables do not)."""
    fused = getattr(model, "fused_parameter_names", None)
    skip = set(fused()) if callable(fused) else set()
    for name, param in model.named_parameters():
        if param.requires_grad and name not in skip:
            yield param


def _fused_lr_setter(model: nn.Module) -> Callable[[float], None]:
    optimizer = getattr(model, "fused_optimizer", None)
    if optimizer is None:
        return lambda lr: None

    def set_lr(lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr

    return set_lr


def shard_for_benchmark(
    model_config: ModelConfig, batch_size: int, lr: float
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The sharded model and dense optimizer ``dlrm train`` would build (tools/bench/dlrm.py)."""
    config = TrainConfig(data=".", model=model_config, batch_size=batch_size, learning_rate=lr)
    state = ParallelState.init("cpu")
    run = shard_model(config, state)
    return run.model, run.dense_optimizer
