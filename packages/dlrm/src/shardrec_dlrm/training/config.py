"""The run configuration of ``dlrm train``: one dataclass, filled by the command line, a TOML file
and the environment (in that order of precedence), and saved beside every checkpoint; the model's
part of it is :class:`~shardrec_dlrm.model.config.ModelConfig`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Final, Literal, get_args

from shardrec_dlrm.model.config import DensePrecision, ModelConfig, positive
from shardrec_dlrm.training.schedule import LRSchedule

OptimizerName = Literal["sgd", "adagrad", "rowwise_adagrad", "adam"]
#: ``auto`` (the planner chooses per table) and every member of core's ``ShardingType``, spelled
#: out so that ``dlrm --help`` does not import torch (a test keeps the two equal).
ShardingName = Literal[
    "auto",
    "table_wise",
    "row_wise",
    "column_wise",
    "data_parallel",
    "table_row_wise",
    "table_column_wise",
    "grid_shard",
]
DeviceName = Literal["auto", "cpu", "cuda"]
DataFormat = Literal["auto", "tsv", "csv", "preprocessed"]
CommPrecision = Literal["fp32", "fp16", "bf16"]

COMM_PRECISIONS: Final = get_args(CommPrecision)
OPTIMIZERS: Final = get_args(OptimizerName)
SHARDINGS: Final = get_args(ShardingName)
DEVICES: Final = get_args(DeviceName)
DATA_FORMATS: Final = get_args(DataFormat)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything ``dlrm train`` does. Step counts are optimizer steps; batch sizes are per rank."""

    data: str
    data_format: DataFormat = "auto"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    batch_size: int = 256
    eval_batch_size: int | None = None
    epochs: int = 1
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    limit_test_batches: int | None = None
    validation_freq: int | None = None
    seed: int = 0
    optimizer: OptimizerName = "sgd"
    learning_rate: float = 1.0
    eps: float = 1e-8
    lr_warmup_steps: int = 0
    lr_decay_start: int = 0
    lr_decay_steps: int = 0
    sharding: ShardingName = "auto"
    device: DeviceName = "auto"
    dense_precision: DensePrecision = "fp32"
    comm_precision: CommPrecision = "fp32"
    """Wire dtype of the pooled embeddings' collectives and their gradients (both ways)."""
    logdir: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    pipeline: bool = True
    shuffle: bool = True
    log_every: int = 50
    """Steps between reads of the training loss (each one a host synchronisation); validation
    and checkpoints read it too."""

    def __post_init__(self) -> None:
        positive("batch_size", self.batch_size)
        positive("epochs", self.epochs)
        for name in (
            "eval_batch_size",
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
            "validation_freq",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if value is not None:
                positive(name, value)
        positive("keep_checkpoints", self.keep_checkpoints)
        positive("log_every", self.log_every)
        for name in ("learning_rate", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        # The schedule checks how its three step counts fit together.
        LRSchedule(
            base_lr=self.learning_rate,
            warmup_steps=self.lr_warmup_steps,
            decay_start=self.lr_decay_start,
            decay_steps=self.lr_decay_steps,
        )
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("sharding", SHARDINGS),
            ("device", DEVICES),
            ("data_format", DATA_FORMATS),
            ("comm_precision", COMM_PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint_dir to resume from")
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir to write to")
        if self.overwrite and self.checkpoint_dir is None:
            raise ValueError("overwrite needs a checkpoint_dir whose run it replaces")
        if self.overwrite and self.resume:
            raise ValueError(
                "resume continues the run in checkpoint_dir, overwrite deletes it: choose one"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
