"""``run_config.json``: what the run in a checkpoint directory was started with.

Written once, when a run claims its directory, and never rewritten by a resume: it is the contract
that every later ``--resume`` is checked against. Beside the options (``TrainConfig``) it records
what the order of the samples depends on: the training split (its pieces, and a digest of its
first and last rows; the path is kept for messages only) and the global batch
(``batch_size x world_size``). A step ``s`` of the run has
then trained exactly the first ``s`` global batches of the sample order, whatever the number of
processes, so a resume at another process count with the same global batch continues with the
very sample the old run would have trained next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from shardrec_dlrm.data.dataset import SplitReader
from shardrec_dlrm.data.files import read_small_text
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.model.config import ModelConfig, model_config_from_dict
from shardrec_dlrm.training.config import TrainConfig

RUN_CONFIG: Final = "run_config.json"

#: Options that decide which sample each step trains, and how: a resume must keep them. The
#: others (epochs, validation, checkpoint frequency, logging, device, sharding) may change.
RESUME_FIXED: Final = (
    "seed",
    "limit_train_batches",
    "val_fraction",
    "test_fraction",
    "optimizer",
    "learning_rate",
    "eps",
    "lr_warmup_steps",
    "lr_decay_start",
    "lr_decay_steps",
    "dense_precision",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunFacts:
    """What a run's sample order depends on besides its options."""

    world_size: int
    data_path: str
    train_segments: tuple[tuple[int, int, int], ...]
    """``(part, start, stop)`` of every piece of the training split."""
    train_sample: str
    """SHA-256 of the training split's first and last rows (see :func:`train_sample_digest`)."""

    def to_dict(self, config: TrainConfig) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "global_batch_size": config.batch_size * self.world_size,
            "data_path": self.data_path,
            "train_segments": [list(segment) for segment in self.train_segments],
            "train_sample": self.train_sample,
        }


#: Rows hashed at each end of the training split to tell one data set from another.
SAMPLE_ROWS: Final = 1024


def train_sample_digest(split: SplitReader) -> str:
    """SHA-256 of the first and last :data:`SAMPLE_ROWS` rows of ``split`` (labels, transformed
    dense features, raw ids): cheap at any size, and it tells apart data sets of the same size
    that differ in those rows (not data changed only in between)."""
    digest = hashlib.sha256()
    ends = ((0, SAMPLE_ROWS), (max(split.num_rows - SAMPLE_ROWS, 0), split.num_rows))
    for start, stop in ends:
        rows = split.rows(start, stop)
        for column in (rows.labels, rows.dense, rows.sparse):
            digest.update(np.ascontiguousarray(column).tobytes())
    return digest.hexdigest()


def record_json(config: TrainConfig, facts: RunFacts) -> str:
    """The text of ``run_config.json``: the options at top level (as ``dlrm evaluate`` reads
    them) and the facts under ``run``."""
    values = dataclasses.asdict(config)
    values["run"] = facts.to_dict(config)
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object of a ``run_config.json``; a one-line :class:`UserError` naming the file
    when it is not one (not a regular file, too large, not JSON)."""
    text = read_small_text(path)
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a JSON object")
    return saved


def saved_model(saved: dict[str, Any], path: Path) -> ModelConfig:
    model = saved.get("model")
    if not isinstance(model, dict):
        raise UserError(f"{path}: no 'model' section")
    try:
        return model_config_from_dict(model, source=str(path))
    except ValueError as error:
        raise UserError(str(error)) from error


def resume_conflicts(
    saved: dict[str, Any], path: Path, config: TrainConfig, facts: RunFacts
) -> list[str]:
    """Every way ``config`` on ``facts`` would not continue the run recorded in ``saved``, each
    naming the option; empty when the resume continues exactly."""
    previous = saved_model(saved, path)
    conflicts: list[str] = []
    if previous != config.model:
        conflicts.append(f"the model ({model_diff(previous, config.model)})")
    run = saved.get("run")
    if not isinstance(run, dict):
        raise UserError(
            f"{path}: records no sample position (written by an older dlrm): start a new "
            "--checkpoint-dir"
        )
    global_batch = config.batch_size * facts.world_size
    saved_batch = run.get("global_batch_size")
    if saved_batch != global_batch:
        hint = ""
        if isinstance(saved_batch, int) and saved_batch % facts.world_size == 0:
            per_rank = saved_batch // facts.world_size
            hint = f"; on {facts.world_size} process(es) use --batch-size {per_rank}"
        conflicts.append(
            f"--batch-size x processes: the run trained global batches of {saved_batch} "
            f"(--batch-size {saved.get('batch_size')} x {run.get('world_size')} process(es)), "
            f"this one would train {global_batch} (--batch-size {config.batch_size} x "
            f"{facts.world_size}){hint}"
        )
    # The rows decide, not the path: data moved, or preprocessed from the same file, continues.
    if (
        run.get("train_segments") != [list(s) for s in facts.train_segments]
        or run.get("train_sample") != facts.train_sample
    ):
        conflicts.append(
            f"--data: {facts.data_path} does not hold the training rows the run trained on "
            f"(from {run.get('data_path')})"
        )
    for name in RESUME_FIXED:
        now = getattr(config, name)
        if saved.get(name) != now:
            option = "--" + name.replace("_", "-")
            conflicts.append(f"{option} was {saved.get(name)}, now {now}")
    return conflicts


def model_diff(old: ModelConfig, new: ModelConfig) -> str:
    changed = [
        f"{name} {getattr(old, name)} -> {getattr(new, name)}"
        for name in (field.name for field in dataclasses.fields(old))
        if getattr(old, name) != getattr(new, name)
    ]
    return ", ".join(changed)
