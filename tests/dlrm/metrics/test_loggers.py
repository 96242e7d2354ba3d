"""The TensorBoard logger's files, read back with TensorBoard's own reader."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from shardrec_dlrm.metrics.loggers import NullLogger, TensorBoardLogger


def read_events(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_and_text_come_back_from_tensorboard(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.log({"train/loss": 0.5, "train/lr": 0.1}, step=1)
    logger.log({"train/loss": 0.25}, step=2)
    logger.log_text("config", "batch_size = 32\nseed = 0")
    logger.close()
    events = read_events(tmp_path)
    tags = events.Tags()
    assert {"train/loss", "train/lr"} <= set(tags["scalars"])
    loss = events.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 0.5), (2, 0.25)]
    assert any(tag.startswith("config") for tag in tags["tensors"])


def test_null_logger_writes_nothing(tmp_path: Path) -> None:
    logger = NullLogger()
    logger.log({"train/loss": 1.0}, step=1)
    logger.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_unusual_values_are_still_written(tmp_path: Path, value: float) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.log({"val/auc": value}, step=3)
    logger.close()
    events = read_events(tmp_path)
    [event] = events.Scalars("val/auc")
    assert event.step == 3
    assert (event.value != event.value) if value != value else event.value == pytest.approx(value)


def test_a_resumed_logger_replaces_what_was_logged_after_its_checkpoint(tmp_path: Path) -> None:
    interrupted = TensorBoardLogger(tmp_path)
    for step in range(1, 6):
        interrupted.log({"train/loss": float(step)}, step=step)
    interrupted.close()
    # Event files are read in name order, which starts with the second they were created in; a
    # resumed run starts seconds after the one it resumes, never within the same second.
    time.sleep(1.1)
    resumed = TensorBoardLogger(tmp_path, purge_from=3)  # from the checkpoint of step 2
    for step in (3, 4):
        resumed.log({"train/loss": 10.0 * step}, step=step)
    resumed.close()
    loss = read_events(tmp_path).Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
