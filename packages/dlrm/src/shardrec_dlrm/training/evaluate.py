"""Scoring: the metrics of a model over batches on all ranks (validation and test during training),
and ``dlrm evaluate``, which scores a saved model on a split of some data at any world size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from shardrec_dlrm.errors import UserError
from shardrec_dlrm.metrics import metrics_for
from shardrec_dlrm.training.checkpointing import load_for_evaluation, saved_model_config
from shardrec_dlrm.training.config import DataFormat, DeviceName, TrainConfig
from shardrec_dlrm.training.parallel import ParallelState
from shardrec_dlrm.training.run_data import Batch, open_run_data
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
    """Loads the checkpoint into a model sharded for this run; scores the split (all ranks).

    Holds the tables once: they are built shard by shard (not whole, then sharded), the
    checkpoint's weights are read straight into them, and no optimizer state is built or read."""
    model_config = saved_model_config(config.checkpoint)
    try:
        state = ParallelState.init(config.device)
    except ValueError as error:
        raise UserError(str(error)) from error
    try:
        run_config = TrainConfig(
            data=config.data,
            model=model_config,
            # Scoring takes no optimizer state: SGD tables hold none, so none is built or read.
            optimizer="sgd",
            batch_size=config.batch_size,
            data_format=config.data_format,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            device=config.device,
        )
        data = open_run_data(run_config, state)
        run = shard_model(run_config, state, weights_to_load=True)
        step = load_for_evaluation(config.checkpoint, run.model)
        batches = data.val_batches() if config.split == "val" else data.test_batches()
        samples = (data.val if config.split == "val" else data.test).num_rows
        metrics = evaluate_batches(
            run.model, batches, state.device, limit=config.limit_batches, samples=samples
        )
        return Evaluation(step, metrics, state.rank)
    finally:
        state.close()


def evaluate_batches(
    model: nn.Module,
    batches: Iterator[Batch],
    device: torch.device,
    *,
    limit: int | None = None,
    samples: int = 0,
) -> dict[str, float]:
    """Scores every batch (all ranks together) and returns the metrics of all ranks' samples;
    ``samples`` (the split's size) above ``EXACT_AUC_MAX_SAMPLES`` keeps histograms, not scores."""
    metrics = metrics_for(samples, device)
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if limit is not None and index >= limit:
                break
            on_device = batch.to(device)
            _, logits = model(on_device.dense_features, on_device.sparse_features, on_device.labels)
            metrics.update(logits, on_device.labels)
    model.train()
    return metrics.compute()
