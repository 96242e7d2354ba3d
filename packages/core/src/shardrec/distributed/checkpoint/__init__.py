"""Sharded checkpoints that load at any world size, through torch.distributed.checkpoint.

``save(root, model, step=..., optimizer=...)`` writes ``root/step-N`` atomically, with the size and
SHA-256 of every file in its ``shardrec.json``; ``load(path, model)`` verifies, then loads the
newest (or a given) checkpoint into a model sharded by any plan, at any world size, or into the
unsharded model. ``verify(path)`` checks a checkpoint's files, ``checkpoints(root)`` lists the
complete ones newest first, ``latest(root)`` is the newest, and ``prune(root, keep)`` deletes old
ones. ``sharded_state_dict`` / ``load_sharded_state_dict`` are the in-memory halves (what
``DistributedModelParallel.state_dict`` returns). A module that caches something derived from its
state implements :class:`StateLoaded`: loads write into the state in place, then call its
``state_loaded()``. See docs/checkpoints.md.
"""

from __future__ import annotations

from shardrec.distributed.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    UnverifiedCheckpointWarning,
)
from shardrec.distributed.checkpoint.files import load, save, step_dir
from shardrec.distributed.checkpoint.integrity import (
    checkpoints,
    latest,
    prune,
    read_sidecar,
    verify,
)
from shardrec.distributed.checkpoint.loaded import StateLoaded, notify_state_loaded
from shardrec.distributed.checkpoint.safe_reader import SafeFileSystemReader, read_metadata_file
from shardrec.distributed.checkpoint.sharded_state import (
    load_sharded_state_dict,
    sharded_state_dict,
)

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "SafeFileSystemReader",
    "StateLoaded",
    "UnverifiedCheckpointWarning",
    "checkpoints",
    "latest",
    "load",
    "load_sharded_state_dict",
    "notify_state_loaded",
    "prune",
    "read_metadata_file",
    "read_sidecar",
    "save",
    "sharded_state_dict",
    "step_dir",
    "verify",
]
