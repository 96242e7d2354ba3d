"""``dlrm evaluate``: score a saved model on a split of some data, at any world size."""

from __future__ import annotations

from dataclasses import dataclass

from shardrec_dlrm.errors import UserError
from shardrec_dlrm.training.checkpointing import load_for_evaluation, saved_model_config
from shardrec_dlrm.training.config import DataFormat, DeviceName, TrainConfig
from shardrec_dlrm.training.loop import evaluate_batches
from shardrec_dlrm.training.parallel import ParallelState
from shardrec_dlrm.training.run_data import open_run_data
from shardrec_dlrm.training.sharding import shard_model


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluateConfig:
    checkpoint: str
    data: str
    split: str = "test"
    batch_size: int = 1024
    limit_batches: int | None = None
    data_format: DataFormat = "auto"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    device: DeviceName = "auto"


@dataclass(frozen=True, slots=True)
class Evaluation:
    step: int
    metrics: dict[str, float]
    rank: int


def evaluate(config: EvaluateConfig) -> Evaluation:
    """Loads the checkpoint into a model sharded for this run; scores the split (all ranks)."""
    model_config = saved_model_config(config.checkpoint)
    try:
        state = ParallelState.init(config.device)
    except ValueError as error:
        raise UserError(str(error)) from error
    try:
        run_config = TrainConfig(
            data=config.data,
            model=model_config,
            batch_size=config.batch_size,
            data_format=config.data_format,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            device=config.device,
        )
        data = open_run_data(run_config, state)
        run = shard_model(run_config, state)
        step = load_for_evaluation(config.checkpoint, run.model)
        batches = data.val_batches() if config.split == "val" else data.test_batches()
        samples = (data.val if config.split == "val" else data.test).num_rows
        metrics = evaluate_batches(
            run.model, batches, state.device, limit=config.limit_batches, samples=samples
        )
        return Evaluation(step, metrics, state.rank)
    finally:
        state.close()
