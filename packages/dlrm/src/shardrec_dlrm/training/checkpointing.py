"""The checkpoint directory of a training run, through shardrec's sharded checkpoints
(torch.distributed.checkpoint).

::

    CHECKPOINT_DIR/
      run_config.json       what the run was started with (see :mod:`.run_record`)
      step-00000100/        one checkpoint: tables and their fused optimizer state, sharded as
      step-00000200/        trained; dense layers and the dense optimizer's state; the step

A directory holds one run. A run claims an empty (or new) directory by creating
``run_config.json``; training into a directory that holds another run is refused unless the run
resumes it (``--resume``, checked against ``run_config.json``) or replaces it (``--overwrite``).
A checkpoint loads at any world size and with any plan (the tables are resharded as they load).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Final

from torch import nn

from shardrec_dlrm.data.files import write_atomic
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.model.config import ModelConfig
from shardrec_dlrm.training.config import TrainConfig
from shardrec_dlrm.training.parallel import ParallelState
from shardrec_dlrm.training.run_record import (
    RUN_CONFIG,
    RunFacts,
    read_record,
    record_json,
    resume_conflicts,
    saved_model,
)
from shardrec_dlrm.training.sharding import ShardedRun

__all__ = [
    "RUN_CONFIG",
    "load_for_evaluation",
    "prepare_checkpoint_dir",
    "resume_step",
    "save_checkpoint",
    "saved_model_config",
]

#: What a run leaves in its directory besides run_config.json: checkpoints, saves in progress,
#: checkpoints being replaced, pruned or deleted, and temporary copies of run_config.json.
_RUN_ENTRY: Final = re.compile(
    r"^(\.(old|tmp|pruned)-)?step-\d+$|^\.deleting-.+$|^\." + re.escape(RUN_CONFIG) + r"\..+\.tmp$"
)
_DELETING: Final = ".deleting-"


def prepare_checkpoint_dir(config: TrainConfig, facts: RunFacts) -> None:
    """Rank 0, before anything is loaded or saved: claims ``--checkpoint-dir`` for this run, or
    checks that ``--resume`` continues the run it holds, or (``--overwrite``) deletes that run.

    Raises :class:`UserError` naming the directory and the ways on when the directory holds
    another run, and naming every option that a resume would change.
    """
    assert config.checkpoint_dir is not None
    root = Path(config.checkpoint_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --checkpoint-dir {root}: {error.strerror}") from error
    record = root / RUN_CONFIG
    has_record = os.path.lexists(record)
    if config.resume and has_record:
        conflicts = resume_conflicts(read_record(record), record, config, facts)
        if conflicts:
            raise UserError(
                f"{root}: --resume would not continue its run: {'; '.join(conflicts)}. Resume "
                "with the run's options, or train into another --checkpoint-dir"
            )
        return
    entries = _run_entries(root)
    if config.resume and entries:
        raise UserError(
            f"{root}: holds checkpoints but no {RUN_CONFIG}, so what they were trained with is "
            "unknown: train into another --checkpoint-dir, or replace them with --overwrite"
        )
    text = record_json(config, facts)
    if entries or has_record:
        if not config.overwrite:
            found = sum(1 for path in entries if path.name.startswith("step-"))
            what = f"{RUN_CONFIG} and " if has_record else ""
            if found:
                what += f"{found} checkpoint(s)"
            else:
                # Refused all the same: that run may still be on its way to its first save.
                what += "no checkpoint yet: stopped before its first save, or still running"
            raise UserError(
                f"{root} holds another run ({what}): continue it with --resume, train into "
                "another --checkpoint-dir, or delete it with --overwrite"
            )
        _remove(entries)
        write_atomic(record, text, exclusive=False)
        return
    try:
        write_atomic(record, text, exclusive=True)
    except FileExistsError as error:
        raise UserError(f"{root}: another run claimed this directory just now") from error


def _run_entries(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if _RUN_ENTRY.match(path.name))


def _remove(entries: list[Path]) -> None:
    """Deletes a run's entries so that no half-deleted checkpoint is ever seen as one: each is
    first renamed out of the ``step-N`` namespace, then removed (a symlink itself, never what it
    points to)."""
    for path in entries:
        doomed = path
        if not path.name.startswith(_DELETING):
            doomed = path.with_name(_DELETING + path.name.removeprefix("."))
            _delete(doomed)
            os.replace(path, doomed)
        _delete(doomed)


def _delete(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def save_checkpoint(run: ShardedRun, config: TrainConfig, state: ParallelState, step: int) -> Path:
    """Collective: every rank saves its shards of step ``step``; then rank 0 deletes all but the
    ``--keep-checkpoints`` newest (never the newest intact one)."""
    from shardrec.distributed.checkpoint import CheckpointError, prune, save

    assert config.checkpoint_dir is not None
    root = config.checkpoint_dir
    try:
        saved = save(root, run.model, step=step, optimizer=run.dense_optimizer)
    except (CheckpointError, OSError) as error:
        raise UserError(f"cannot save a checkpoint in {root}: {error}") from error

    def prune_old() -> None:
        try:
            prune(root, config.keep_checkpoints)
        except CheckpointError as error:
            raise UserError(f"cannot delete old checkpoints in {root}: {error}") from error

    state.decide_on_main(prune_old)
    return saved


def resume_step(run: ShardedRun, config: TrainConfig, state: ParallelState) -> int:
    """Loads the newest intact checkpoint of ``--checkpoint-dir`` (collective) and returns its
    step; 0 when there is none yet. Call after :func:`prepare_checkpoint_dir`.

    A checkpoint whose files do not match the checksums its save recorded is passed over with a
    one-line warning naming the bad file; when none is intact, the resume is refused.
    """
    from shardrec.distributed.checkpoint import (
        CheckpointError,
        CorruptCheckpointError,
        checkpoints,
        load,
    )

    assert config.checkpoint_dir is not None
    root = Path(config.checkpoint_dir)
    candidates = state.decide_on_main(lambda: [str(path) for path in checkpoints(root)])
    bad: list[str] = []
    for candidate in candidates:
        try:
            step = load(candidate, run.model, optimizer=run.dense_optimizer)
        except CorruptCheckpointError as error:
            bad.append(str(error))
            continue  # verified before anything was loaded: the model is untouched
        except CheckpointError as error:
            raise UserError(str(error)) from error
        if state.is_main:
            for message in bad:
                warn(f"{message}; resuming from the older {Path(candidate).name} instead")
        return step
    if bad:
        raise UserError(
            f"{root}: no intact checkpoint to resume from (newest: {bad[0]}): train into another "
            "--checkpoint-dir, or start again with --overwrite"
        )
    return 0


def load_for_evaluation(checkpoint: str, model: nn.Module) -> int:
    """Loads the weights of ``checkpoint`` (a directory of checkpoints: its newest; or one) into
    ``model``, after verifying every file against the checksums its save recorded.

    Read straight into ``model`` (``in_place``): a load that fails part-way leaves it half
    loaded, and the caller throws it away. Only the optimizer state ``model`` has is read (the
    dense optimizer's never is)."""
    from shardrec.distributed.checkpoint import CheckpointError, CorruptCheckpointError, load

    try:
        return load(checkpoint, model, in_place=True)
    except CorruptCheckpointError as error:
        raise UserError(
            f"{error} (not scored: name an older checkpoint with --checkpoint DIR/step-N)"
        ) from error
    except CheckpointError as error:
        raise UserError(str(error)) from error


def saved_model_config(checkpoint: str) -> ModelConfig:
    """The model options a checkpoint was trained with, from ``run_config.json`` beside it."""
    path = Path(checkpoint)
    for candidate in (path / RUN_CONFIG, path.parent / RUN_CONFIG):
        if os.path.lexists(candidate):
            return saved_model(read_record(candidate), candidate)
    raise UserError(
        f"{path}: no {RUN_CONFIG} here or in the parent directory (not a dlrm checkpoint?)"
    )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
