"""Checkpoints of a training run, through shardrec's sharded checkpoints
(torch.distributed.checkpoint).

::

    CHECKPOINT_DIR/
      run_config.json       the run's TrainConfig (what ``dlrm evaluate`` rebuilds the model from)
      step-00000100/        one checkpoint: tables and their fused optimizer state, sharded as
      step-00000200/        trained; dense layers and the dense optimizer's state; the step

A checkpoint loads at any world size and with any plan (the tables are resharded as they load).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Final

from torch import nn

from shardrec_dlrm.config import ModelConfig, TrainConfig, load_model_config
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.parallel import ParallelState
from shardrec_dlrm.sharding import ShardedRun

RUN_CONFIG: Final = "run_config.json"


def write_run_config(config: TrainConfig, state: ParallelState) -> None:
    """Rank 0 records the run's configuration beside its checkpoints (atomically)."""
    if config.checkpoint_dir is None or not state.is_main:
        return
    root = Path(config.checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / RUN_CONFIG
    partial = target.with_name(target.name + ".partial")
    partial.write_text(config.to_json())
    os.replace(partial, target)


def save_checkpoint(run: ShardedRun, config: TrainConfig, step: int) -> Path:
    """Collective: every rank saves its shards of step ``step``."""
    from shardrec.distributed.checkpoint import CheckpointError, save

    assert config.checkpoint_dir is not None
    try:
        return save(config.checkpoint_dir, run.model, step=step, optimizer=run.dense_optimizer)
    except (CheckpointError, OSError) as error:
        raise UserError(f"cannot save a checkpoint in {config.checkpoint_dir}: {error}") from error


def resume_step(run: ShardedRun, config: TrainConfig) -> int:
    """Loads the newest checkpoint of ``--checkpoint-dir`` (collective); 0 when there is none
    yet."""
    from shardrec.distributed.checkpoint import CheckpointError, latest, load

    assert config.checkpoint_dir is not None
    root = Path(config.checkpoint_dir)
    if latest(root) is None:
        return 0
    saved = root / RUN_CONFIG
    if saved.exists():
        try:
            previous = load_model_config(saved)
        except ValueError as error:
            raise UserError(str(error)) from error
        if previous != config.model:
            raise UserError(
                f"{root}: its checkpoints are of another model ({_diff(previous, config.model)}); "
                "resume with the same model options, or use another --checkpoint-dir"
            )
    try:
        return load(root, run.model, optimizer=run.dense_optimizer)
    except CheckpointError as error:
        raise UserError(str(error)) from error


def load_for_evaluation(checkpoint: str, model: nn.Module) -> int:
    """Loads the weights of ``checkpoint`` (a directory of checkpoints, or one) into ``model``."""
    from shardrec.distributed.checkpoint import CheckpointError, load

    try:
        return load(checkpoint, model)
    except CheckpointError as error:
        raise UserError(str(error)) from error


def saved_model_config(checkpoint: str) -> ModelConfig:
    """The model options a checkpoint was trained with, from ``run_config.json`` beside it."""
    path = Path(checkpoint)
    for candidate in (path / RUN_CONFIG, path.parent / RUN_CONFIG):
        if candidate.exists():
            try:
                return load_model_config(candidate)
            except ValueError as error:
                raise UserError(str(error)) from error
    raise UserError(
        f"{path}: no {RUN_CONFIG} here or in the parent directory (not a dlrm checkpoint?)"
    )


def _diff(old: ModelConfig, new: ModelConfig) -> str:
    changed = [
        f"{name} {getattr(old, name)} -> {getattr(new, name)}"
        for name in (field.name for field in dataclasses.fields(old))
        if getattr(old, name) != getattr(new, name)
    ]
    return ", ".join(changed)
