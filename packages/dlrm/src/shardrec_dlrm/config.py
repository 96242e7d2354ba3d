"""The run configuration of ``dlrm train``: one dataclass, filled by the command line, a TOML file
and the environment (in that order of precedence), and saved beside every checkpoint so ``dlrm
evaluate`` can rebuild the model."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from shardrec_dlrm.schedule import LRSchedule

InteractionType = Literal["dot", "dcn"]
OptimizerName = Literal["sgd", "adagrad", "rowwise_adagrad", "adam"]
ShardingName = Literal[
    "auto", "table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"
]
DeviceName = Literal["auto", "cpu", "cuda"]
DataFormat = Literal["auto", "tsv", "csv", "preprocessed"]
DensePrecision = Literal["fp32", "bf16"]
CommPrecision = Literal["fp32", "fp16", "bf16"]

INTERACTION_TYPES: Final = get_args(InteractionType)
DENSE_PRECISIONS: Final = get_args(DensePrecision)
COMM_PRECISIONS: Final = get_args(CommPrecision)
OPTIMIZERS: Final = get_args(OptimizerName)
SHARDINGS: Final = get_args(ShardingName)
DEVICES: Final = get_args(DeviceName)
DATA_FORMATS: Final = get_args(DataFormat)

NUM_DENSE_FEATURES: Final = 13
NUM_SPARSE_FEATURES: Final = 26


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """What it takes to rebuild the model's shapes (saved with checkpoints)."""

    embedding_dim: int = 64
    num_embeddings: int = 100_000
    num_embeddings_per_feature: tuple[int, ...] | None = None
    dense_arch_layer_sizes: tuple[int, ...] = (512, 256, 64)
    over_arch_layer_sizes: tuple[int, ...] = (512, 512, 256, 1)
    interaction_type: InteractionType = "dot"
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 512

    def __post_init__(self) -> None:
        _positive("embedding_dim", self.embedding_dim)
        if self.num_embeddings < 2:
            raise ValueError(
                "num_embeddings must be >= 2 (row 0 holds missing values), got "
                f"{self.num_embeddings}"
            )
        _positive("dcn_num_layers", self.dcn_num_layers)
        _positive("dcn_low_rank_dim", self.dcn_low_rank_dim)
        if self.num_embeddings_per_feature is not None:
            sizes = self.num_embeddings_per_feature
            if len(sizes) != NUM_SPARSE_FEATURES:
                raise ValueError(
                    f"num_embeddings_per_feature needs {NUM_SPARSE_FEATURES} numbers, "
                    f"got {len(sizes)}"
                )
            for index, size in enumerate(sizes):
                if size < 2:
                    raise ValueError(
                        f"num_embeddings_per_feature[{index}] (C{index + 1}) must be >= 2: row 0 "
                        f"holds missing values; got {size}"
                    )
        if self.interaction_type not in INTERACTION_TYPES:
            raise ValueError(
                f"interaction_type must be one of {', '.join(INTERACTION_TYPES)}, "
                f"got {self.interaction_type!r}"
            )
        if not self.dense_arch_layer_sizes or self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                "dense_arch_layer_sizes must end with the embedding dimension "
                f"{self.embedding_dim}, "
                f"got {','.join(map(str, self.dense_arch_layer_sizes))}"
            )
        if not self.over_arch_layer_sizes or self.over_arch_layer_sizes[-1] != 1:
            raise ValueError(
                "over_arch_layer_sizes must end with 1 (the logit), got "
                f"{','.join(map(str, self.over_arch_layer_sizes))}"
            )
        for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            for size in getattr(self, name):
                _positive(name, size)

    def table_sizes(self) -> tuple[int, ...]:
        if self.num_embeddings_per_feature is not None:
            return self.num_embeddings_per_feature
        return (self.num_embeddings,) * NUM_SPARSE_FEATURES


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

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("epochs", self.epochs)
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
                _positive(name, value)
        _positive("keep_checkpoints", self.keep_checkpoints)
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


def model_config_from_dict(values: dict[str, Any], *, source: str) -> ModelConfig:
    """Rebuilds a :class:`ModelConfig` saved by :meth:`TrainConfig.to_json`; errors name
    ``source``."""
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model setting(s) {', '.join(unknown)}")
    fixed = dict(values)
    for name in ("num_embeddings_per_feature", "dense_arch_layer_sizes", "over_arch_layer_sizes"):
        if isinstance(fixed.get(name), list):
            fixed[name] = tuple(fixed[name])
    try:
        return ModelConfig(**fixed)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
