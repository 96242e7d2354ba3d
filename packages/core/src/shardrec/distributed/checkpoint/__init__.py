"""Sharded checkpoints that load at any world size, through torch.distributed.checkpoint.

``save(root, model, step=..., optimizer=...)`` writes ``root/step-N`` atomically; ``load(path,
model)`` loads the newest (or a given) checkpoint into a model sharded by any plan, at any world
size, or into the unsharded model; ``latest(root)`` finds the newest complete one.
``sharded_state_dict`` /
``load_sharded_state_dict`` are the in-memory halves (what ``DistributedModelParallel.state_dict``
returns). See docs/checkpoints.md.
"""

from __future__ import annotations

from shardrec.distributed.checkpoint.errors import CheckpointError
from shardrec.distributed.checkpoint.files import latest, load, read_sidecar, save, step_dir
from shardrec.distributed.checkpoint.safe_reader import SafeFileSystemReader, read_metadata_file
from shardrec.distributed.checkpoint.sharded_state import (
    load_sharded_state_dict,
    sharded_state_dict,
)

__all__ = [
    "CheckpointError",
    "SafeFileSystemReader",
    "latest",
    "load",
    "load_sharded_state_dict",
    "read_metadata_file",
    "read_sidecar",
    "save",
    "sharded_state_dict",
    "step_dir",
]
