"""Checkpoint directories on disk: ``save`` and ``load`` over torch.distributed.checkpoint.

Layout under a root directory::

    root/
      step-00000100/        a complete checkpoint: DCP files, .metadata, shardrec.json
      step-00000200/
      .tmp-step-00000300/   a save in progress (or one that crashed): never read

A save writes everything into ``.tmp-step-N`` (DCP fsyncs each file; every file is created with
``O_EXCL | O_NOFOLLOW``), then rank 0 hashes every file, writes ``shardrec.json`` (step, format,
shapes, dense optimizer hyper-parameters, the file list with sizes and SHA-256, its own checksum),
fsyncs it and the directory, and renames the directory to ``step-N`` in one atomic ``rename``. A
crash at any point leaves the earlier ``step-*`` directories untouched, and ``latest`` only sees
complete ones. All ranks must see the same file system (one host, or a shared mount).

A load first verifies the checkpoint (rank 0 hashes its files; every rank checks its structure and
the verdicts are agreed, so all ranks raise together or none does). Loading never unpickles code:
tensors come back through ``torch.load(weights_only=True)`` inside DCP, DCP's metadata through an
allow-listed unpickler, and ours from JSON; only tensor entries the model expects are read, each
checked against the model's shape before anything is allocated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from shardrec.distributed.checkpoint.dense_optim import (
    DENSE,
    dense_optimizer_state,
    dense_tables,
    dense_targets,
    load_dense,
)
from shardrec.distributed.checkpoint.errors import CheckpointError, CorruptCheckpointError
from shardrec.distributed.checkpoint.integrity import (
    FILES,
    FORMAT,
    SIDECAR,
    fsync_dir,
    latest,
    list_files,
    read_sidecar,
    sealed_sidecar,
    verify,
)
from shardrec.distributed.checkpoint.safe_files import SafeFileSystem, create_member
from shardrec.distributed.checkpoint.safe_reader import (
    METADATA,
    SafeFileSystemReader,
    read_metadata_file,
    tensor_entries,
    tensor_only_planner,
)
from shardrec.distributed.checkpoint.save_planner import ExactStorageSavePlanner
from shardrec.distributed.checkpoint.sharded_state import (
    check_shapes,
    load_sharded_state_dict,
    load_target,
    quiet_sharded_tensor,
    sharded_state_dict,
    state_shapes,
)


def _dist_on(pg: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(pg: dist.ProcessGroup | None) -> int:
    return dist.get_rank(pg) if _dist_on(pg) else 0


def _agree(pg: dist.ProcessGroup | None, error: CheckpointError | None) -> None:
    """A collective in place of a barrier: if any rank failed, every rank raises the first
    failure (by rank), so no rank is left waiting in a later collective."""
    if not _dist_on(pg) or dist.get_world_size(pg) == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else (isinstance(error, CorruptCheckpointError), str(error))
    verdicts: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(verdicts, mine, group=pg)
    for verdict in verdicts:
        if verdict is not None:
            corrupt, message = verdict
            raise (CorruptCheckpointError if corrupt else CheckpointError)(message) from error


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save(
    root: str | Path,
    model: nn.Module,
    *,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    pg: dist.ProcessGroup | None = None,
) -> Path:
    """Save ``model`` (sharded or not) and its optimizer state as ``root/step-<step>``; atomic.

    Collective: every rank calls it with the same ``root`` and ``step``. The fused optimizer state
    of sharded tables is always saved; ``optimizer`` adds a torch optimizer's state (dense
    parameters), keyed by parameter name. The sidecar ``shardrec.json`` lists every file written,
    with its size and SHA-256 (see :func:`verify`). Returns the checkpoint directory.
    """
    if step < 0:
        raise CheckpointError(f"step must be >= 0, got {step}")
    base = Path(root)
    final = step_dir(base, step)
    tmp = base / f".tmp-{final.name}"
    old = base / f".old-{final.name}"
    rank = _rank(pg)
    error: CheckpointError | None = None
    if rank == 0:
        try:
            base.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # a crashed save of the same step
            if final.exists():
                _remove(old)  # a crash after a re-save completed, before its cleanup
            os.mkdir(tmp)
        except OSError as exc:
            error = CheckpointError(f"{tmp}: cannot prepare the checkpoint directory ({exc})")
    _agree(pg, error)

    state: dict[str, Any] = dict(sharded_state_dict(model, pg))
    body: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "shapes": {k: list(shape) for k, (shape, _) in state_shapes(state).items()},
        "dense_tables": dense_tables(model),
    }
    if optimizer is not None:
        tensors, meta = dense_optimizer_state(model, optimizer)
        state[DENSE] = tensors
        body["dense_optimizer"] = meta
    try:
        json.dumps(body)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"optimizer hyper-parameters are not JSON values: {exc}") from exc

    writer = FileSystemWriter(tmp, sync_files=True)
    writer.fs = SafeFileSystem(tmp)
    writer.path = tmp
    with quiet_sharded_tensor():
        dcp_save(
            state,
            storage_writer=writer,
            planner=ExactStorageSavePlanner(),
            process_group=pg,
            no_dist=not _dist_on(pg),
        )
    _agree(pg, None)  # every rank's files are written and fsynced
    if rank == 0:
        try:
            body[FILES] = list_files(tmp)
            with create_member(tmp, SIDECAR) as f:
                f.write(sealed_sidecar(body).encode())
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(base)
            _remove(old)
        except OSError as exc:
            error = CheckpointError(f"{tmp}: cannot complete the checkpoint ({exc})")
        except CheckpointError as exc:
            error = exc
    _agree(pg, error)
    return final


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if any(os.path.lexists(p / name) for name in (METADATA, SIDECAR)):
        return p  # a checkpoint directory: its files are checked as they are read
    found = latest(p)
    if found is None:
        raise CheckpointError(f"{p}: no complete checkpoint here (nor a step-* directory with one)")
    return found


def load(
    path: str | Path,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    pg: dist.ProcessGroup | None = None,
    strict: bool = True,
    in_place: bool = False,
) -> int:
    """Load a checkpoint into ``model`` (any plan, any world size, or unsharded); returns its step.

    ``path`` is a checkpoint directory or a root (then its newest complete checkpoint). Collective
    when a process group is up. The checkpoint is verified first (:func:`verify`, on rank 0; a
    :class:`CorruptCheckpointError` on every rank if it fails). Raises :class:`CheckpointError`
    naming each missing table and each shape mismatch, before anything is written. With
    ``strict=False`` keys missing on either side are skipped (shapes are still checked, and only
    tensor entries the model expects are read).

    The weights are read into fresh tensors and copied into the model once all are read, so a
    read that fails part-way (a file changed after it was verified) leaves the model as it was.
    ``in_place=True`` reads them straight into the model's tensors instead, never holding the
    weights twice: for a model that is thrown away when the load fails (``dlrm evaluate``'s).
    Everything else is the same: verification, the checks before the first read, what is read.
    """
    target: dict[str, Any] = dict(load_target(model, pg, in_place=in_place))
    error: CheckpointError | None = None
    ckpt = Path(path)
    sidecar: dict[str, Any] = {}
    dense_plan: dict[str, torch.Tensor] | None = None
    try:
        ckpt = _resolve(path)
        if _rank(pg) == 0:
            verify(ckpt)
        sidecar = read_sidecar(ckpt)
        metadata = read_metadata_file(ckpt)
        _select(ckpt, sidecar, metadata, target, model, strict)
        dense_plan = dense_targets(ckpt, sidecar, tensor_entries(metadata), model, optimizer)
    except CheckpointError as exc:
        error = exc
    _agree(pg, error)
    if dense_plan is not None:
        target[DENSE] = dense_plan
    try:
        with quiet_sharded_tensor():
            dcp_load(
                target,
                storage_reader=SafeFileSystemReader(ckpt),
                planner=tensor_only_planner(ckpt),
                process_group=pg,
                no_dist=not _dist_on(pg),
            )
    except CheckpointException as exc:
        raise CheckpointError(_first_failure(ckpt, exc)) from None
    load_sharded_state_dict(
        model,
        {k: v for k, v in target.items() if k in ("model", "optim")},
        strict=False,  # checked above against the checkpoint as a whole
    )
    if optimizer is not None and dense_plan is not None:
        load_dense(model, optimizer, sidecar["dense_optimizer"], dense_plan)
    return int(sidecar["step"])


def _select(
    ckpt: Path,
    sidecar: dict[str, Any],
    metadata: Metadata,
    target: dict[str, Any],
    model: nn.Module,
    strict: bool,
) -> None:
    """Check the checkpoint's entries against ``target`` and cut ``target`` to what is read."""
    expected = state_shapes(target)
    has_fused = bool(target.get("optim"))
    sections = ("model", "optim") if has_fused else ("model",)
    if not has_fused:
        target.pop("optim", None)
    entries = tensor_entries(metadata)
    for key, (_, section) in expected.items():
        if isinstance(metadata.state_dict_metadata.get(f"{section}.{key}"), BytesStorageMetadata):
            raise CheckpointError(
                f"{ckpt / METADATA}: entry {section}.{key} is stored as pickled bytes, not a "
                "tensor; shardrec loads only tensors"
            )
    found: dict[str, tuple[int, ...]] = {}
    for key, md in entries.items():
        for section in sections:
            if key.startswith(f"{section}."):
                found[key[len(section) + 1 :]] = tuple(md.size)
    # A table data-parallel when saved had no fused state: under a fused sharding now, its state
    # starts fresh. A table data-parallel now takes no fused state: what was saved is left out.
    was_dense = set(sidecar.get("dense_tables", []))
    now_dense = set(dense_tables(model))
    for key in [k for k, (_, sec) in expected.items() if sec == "optim" and k not in found]:
        if key.rpartition(".")[0] in was_dense:
            del expected[key]
            target["optim"].pop(key, None)
    for key in [k for k in found if k not in expected and k.rpartition(".")[0] in now_dense]:
        del found[key]
    check_shapes(expected, found, f"checkpoint {ckpt}", sections, strict)
    if not strict:
        for section in list(target):
            target[section] = {
                k: v for k, v in target[section].items() if f"{section}.{k}" in entries
            }


def _first_failure(ckpt: Path, exc: CheckpointException) -> str:
    """One line for the first rank's failure inside DCP (the same on every rank)."""
    for _, (error, _) in sorted(exc.failures.items()):
        if isinstance(error, CheckpointError):
            return str(error)
        text = str(error).splitlines()[0] if str(error) else ""
        return f"{ckpt}: could not be read ({type(error).__name__}: {text})"
    return f"{ckpt}: could not be read"
