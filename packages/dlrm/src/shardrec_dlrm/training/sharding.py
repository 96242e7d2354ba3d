"""Building the sharded model of a run: the DLRM, its plan, DistributedModelParallel, the
optimizers.

The embedding tables train with a fused optimizer (applied inside backward, on the rows a batch
touched), the dense layers with the torch optimizer of the same name. Tables that the plan makes
data-parallel keep plain parameters with ``.grad`` and join the dense optimizer. The learning-rate
schedule drives both: :meth:`ShardedRun.set_lr` sets the dense optimizer's rate and, through
``shardrec.kernels.set_learning_rate``, every fused lookup's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from shardrec.distributed import ShardedEmbeddingModule
from shardrec.distributed.qcomm import QCommsConfig, with_qcomms
from shardrec.kernels import OptimizerType, parse_optimizer, set_learning_rate
from shardrec_dlrm.model.build import build_dlrm
from shardrec_dlrm.model.config import DensePrecision, ModelConfig
from shardrec_dlrm.model.dlrm import DLRMTrain
from shardrec_dlrm.training.config import CommPrecision, DeviceName, OptimizerName, TrainConfig
from shardrec_dlrm.training.parallel import ParallelState
from shardrec_dlrm.training.planning import PlanRequest, discover_sharders, plan_model

#: Tables up to this size (weights) are initialised whole before sharding (see shard_model).
GLOBAL_INIT_BYTES = 1 << 30


@dataclass(slots=True)
class ShardedRun:
    """The model of a run, ready to train: call ``model(dense, kjt, labels) -> (loss, logits)``."""

    model: nn.Module
    dense_optimizer: torch.optim.Optimizer
    #: Sets the learning rate of every fused table of ``model`` (returns how many lookups).
    fused_lr: Callable[[float], int]
    plan_text: str
    #: The rate last given to the fused tables (None: not yet, they hold the configured one).
    fused_lr_now: float | None = None

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step, for the dense optimizer and the fused tables."""
        for group in self.dense_optimizer.param_groups:
            group["lr"] = lr
        if lr != self.fused_lr_now:
            self.fused_lr(lr)
            self.fused_lr_now = lr


def fused_params(optimizer: OptimizerName, lr: float, eps: float) -> dict[str, object]:
    """The tables' ``fused_params``: ``--optimizer`` is one of core's optimizer names (``adagrad``
    is exact Adagrad), read by :func:`shardrec.kernels.parse_optimizer`."""
    return {"optimizer": parse_optimizer(optimizer), "learning_rate": lr, "eps": eps}


def dense_optimizer_for(
    params: list[nn.Parameter], optimizer: OptimizerName, lr: float, eps: float
) -> torch.optim.Optimizer:
    kind = parse_optimizer(optimizer)
    if kind is OptimizerType.SGD:
        return torch.optim.SGD(params, lr=lr)
    if kind in (OptimizerType.EXACT_ADAGRAD, OptimizerType.ROWWISE_ADAGRAD):
        # torch has no row-wise Adagrad: dense layers use the exact one.
        return torch.optim.Adagrad(params, lr=lr, eps=eps)
    return torch.optim.Adam(params, lr=lr, eps=eps)


def shard_model(
    config: TrainConfig, state: ParallelState, *, weights_to_load: bool = False
) -> ShardedRun:
    """Builds the model, plans it, and shards it over the run's processes.

    Tables of at most :data:`GLOBAL_INIT_BYTES` in all are initialised whole, from ``--seed``,
    before sharding, so a run starts from the same weights at any world size and with any plan;
    bigger ones are built on the meta device and each shard is initialised where it lives. With
    ``weights_to_load`` (a checkpoint's weights replace them all) every size takes the second way:
    a whole table and its shards are never held at once. Managed tables' id maps are built on
    meta: each rank materialises only the buckets it owns, empty, where they live.
    """
    from shardrec.distributed.model_parallel import DistributedModelParallel

    table_bytes = 4 * config.model.embedding_dim * sum(config.model.table_sizes())
    whole = table_bytes <= GLOBAL_INIT_BYTES and not weights_to_load
    torch.manual_seed(config.seed)
    model = build_dlrm(
        config.model,
        embedding_device=torch.device("cpu" if whole else "meta"),
        dense_device=state.device,
        fused_params=fused_params(config.optimizer, config.learning_rate, config.eps),
        dense_precision=config.dense_precision,
        # DMP always shards the managed module: each rank builds only its own buckets' maps.
        managed_device=torch.device("meta"),
    )
    request = PlanRequest(
        world_size=state.world_size,
        compute_device=state.device.type,
        batch_size=config.batch_size,
        sharding=config.sharding,
        optimizer=config.optimizer,
        local_world_size=state.nodes.local_world_size,
    )
    sharders = discover_sharders()
    plan, report = plan_model(model, request, sharders, collective=True)
    if config.comm_precision != "fp32":
        plan = with_qcomms(plan, QCommsConfig.both(config.comm_precision))
    # DMP puts the sharded tables in place inside ``model``: its typed arches see them.
    sharded = DistributedModelParallel(
        model, env=state.env, device=state.device, plan=plan, sharders=sharders
    )
    dense = list(_trainable_dense(sharded))
    _average_sharded_gradients(model, state)
    return ShardedRun(
        model=sharded,
        dense_optimizer=dense_optimizer_for(
            dense, config.optimizer, config.learning_rate, config.eps
        ),
        fused_lr=functools.partial(set_learning_rate, sharded),
        plan_text=report,
    )


def _average_sharded_gradients(model: DLRMTrain, state: ParallelState) -> None:
    """Scales the gradients reaching sharded tables by ``1 / world_size``.

    Each rank's loss is the mean over its own part of the global batch. DDP averages the dense
    (and data-parallel table) gradients over ranks, which gives the gradient of the mean over the
    global batch; a sharded table's owner instead sums the gradients every rank sends it, which is
    ``world_size`` times that. Scaling those outputs' gradients makes both the global mean, so
    that N processes train as one process does on the same global batches.
    """
    if state.world_size == 1:
        return
    sparse_arch = model.sparse_arch
    tables = sparse_arch.embedding_bag_collection
    # The sharded tables, also inside managed tables (whose sharded EBC sits one level down).
    sharded = [m for m in tables.modules() if isinstance(m, ShardedEmbeddingModule)]
    shards = sharded[0].local_table_shards() if sharded else {}
    scale = [
        1.0 if table in shards and shards[table].replicated else 1.0 / state.world_size
        for table in sparse_arch.feature_tables
    ]
    per_column = torch.tensor(scale, device=state.device).repeat_interleave(
        sparse_arch.embedding_dim
    )
    sparse_arch.scale_output_gradients(per_column)


def _trainable_dense(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters a torch optimizer must step: those that get a ``.grad``. Tables do not: their
    fused optimizer runs inside backward (on data-parallel replicas, once gradients are summed)."""
    for param in model.parameters():
        if param.requires_grad:
            yield param


def shard_for_benchmark(
    model_config: ModelConfig,
    batch_size: int,
    lr: float,
    dense_precision: DensePrecision = "fp32",
    device: DeviceName = "cpu",
    comm_precision: CommPrecision = "fp32",
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The sharded model and dense optimizer ``dlrm train`` would build (tools/bench/dlrm.py)."""
    config = TrainConfig(
        data=".",
        model=model_config,
        batch_size=batch_size,
        learning_rate=lr,
        dense_precision=dense_precision,
        device=device,
        comm_precision=comm_precision,
    )
    state = ParallelState.init(device)
    run = shard_model(config, state)
    return run.model, run.dense_optimizer
