"""Checkpoint directories on disk: ``save``, ``load`` and ``latest`` over
torch.distributed.checkpoint.

Layout under a root directory::

    root/
      step-00000100/        a complete checkpoint: DCP files, .metadata, shardrec.json
      step-00000200/
      .tmp-step-00000300/   a save in progress (or one that crashed): never read

A save writes everything into ``.tmp-step-N`` (DCP fsyncs each file), then rank 0 writes
``shardrec.json`` (step, format, shapes, dense optimizer hyper-parameters), fsyncs it and the
directory, and renames the directory to ``step-N`` in one atomic ``rename``. A crash at any point
leaves the earlier ``step-*`` directories untouched, and :func:`latest` only sees complete ones. All
ranks must see the same file system (one host, or a shared mount).

Loading never unpickles code: tensors come back through ``torch.load(weights_only=True)`` inside
DCP, DCP's metadata through an allow-listed unpickler, and ours from JSON. Every key and shape is
checked against the model before any weight is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from shardrec.distributed.checkpoint.errors import CheckpointError
from shardrec.distributed.checkpoint.safe_reader import SafeFileSystemReader, read_metadata_file
from shardrec.distributed.checkpoint.sharded_state import (
    check_shapes,
    load_sharded_state_dict,
    quiet_sharded_tensor,
    sharded_state_dict,
    sharded_tables,
    state_shapes,
    unwrap,
)

FORMAT: Final = "shardrec-dcp/1"
SIDECAR: Final = "shardrec.json"
_STEP_DIR: Final = re.compile(r"^(\.old-)?step-(\d+)$")
_DENSE: Final = "dense_optim"


def _dist_on(pg: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(pg: dist.ProcessGroup | None) -> int:
    return dist.get_rank(pg) if _dist_on(pg) else 0


def _barrier(pg: dist.ProcessGroup | None) -> None:
    if _dist_on(pg):
        dist.barrier(group=pg)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / SIDECAR).is_file()


def latest(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None if there is none.

    A re-save of step N moves the old ``step-N`` aside as ``.old-step-N`` for a moment; a crash in
    that moment leaves no ``step-N``, and the old one is found there.
    """
    base = Path(root)
    if not base.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for child in sorted(base.iterdir()):
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and _complete(child):
            rank = (int(m.group(2)), 0 if m.group(1) else 1)  # step-N before .old-step-N
            if best is None or rank > best[:2]:
                best = (*rank, child)
    return best[2] if best else None


def param_names(model: nn.Module) -> dict[int, str]:
    """``id(param)`` -> its name; a data-parallel table's weight is named by its unsharded key, so
    its optimizer state follows it to any plan where the table is data-parallel again."""
    root = unwrap(model)
    names = {id(p): n for n, p in root.named_parameters()}
    tables, _ = sharded_tables(root)
    by_ptr = {
        (t.shards.weight[0].tensor.data_ptr(), tuple(t.shards.weight[0].tensor.shape)): t.key
        for t in tables
        if t.shards.replicated and t.shards.weight
    }
    for p in root.parameters():
        key = by_ptr.get((p.data_ptr(), tuple(p.shape)))
        if key is not None:
            names[id(p)] = key
    return names


def _dense_tables(model: nn.Module) -> list[str]:
    """Tables trained by a torch optimizer (data-parallel: replicated, no fused state)."""
    tables, _ = sharded_tables(unwrap(model))
    return sorted(t.key for t in tables if t.shards.replicated and not t.shards.optimizer_state)


def _dense_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors keyed ``<param name>.<state>``, and the JSON part (hyper-parameters, scalar
    states)."""
    names = param_names(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise CheckpointError(
            f"the optimizer holds {len(missing)} parameter(s) that are not the model's "
            f"(positions {missing[:5]}): give the optimizer of this model"
        )
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        fqn = names[id(params[index])]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}.{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = []
    flat = 0
    for group in sd["param_groups"]:
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = [names[id(params[flat + i])] for i in range(len(group["params"]))]
        flat += len(group["params"])
        groups.append(entry)
    return tensors, {"param_groups": groups, "scalars": scalars}


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
    parameters), keyed by parameter name. Returns the checkpoint directory.
    """
    if step < 0:
        raise CheckpointError(f"step must be >= 0, got {step}")
    base = Path(root)
    final = step_dir(base, step)
    tmp = base / f".tmp-{final.name}"
    rank = _rank(pg)
    if rank == 0:
        base.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a crashed save of the same step
        old = base / f".old-{final.name}"
        if old.exists() and final.exists():
            shutil.rmtree(old)  # a crash after a re-save completed, before its cleanup
    _barrier(pg)

    state: dict[str, Any] = dict(sharded_state_dict(model, pg))
    sidecar: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "shapes": {k: list(shape) for k, (shape, _) in state_shapes(state).items()},
        "dense_tables": _dense_tables(model),
    }
    if optimizer is not None:
        tensors, meta = _dense_optimizer_state(model, optimizer)
        state[_DENSE] = tensors
        sidecar["dense_optimizer"] = meta
    try:
        text = json.dumps(sidecar, indent=1, sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"optimizer hyper-parameters are not JSON values: {exc}") from exc

    writer = FileSystemWriter(tmp, sync_files=True)
    with quiet_sharded_tensor():
        dcp_save(state, storage_writer=writer, process_group=pg, no_dist=not _dist_on(pg))
    _barrier(pg)
    if rank == 0:
        with (tmp / SIDECAR).open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = base / f".old-{final.name}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(base)
        if old.exists():
            shutil.rmtree(old)
    _barrier(pg)
    return final


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if _complete(p):
        return p
    found = latest(p)
    if found is None:
        raise CheckpointError(f"{p}: no complete checkpoint here (nor a step-* directory with one)")
    return found


def read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / SIDECAR).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / SIDECAR}: unreadable ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path / SIDECAR}: not a {FORMAT} checkpoint")
    return data


def load(
    path: str | Path,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    pg: dist.ProcessGroup | None = None,
    strict: bool = True,
) -> int:
    """Load a checkpoint into ``model`` (any plan, any world size, or unsharded); returns its step.

    ``path`` is a checkpoint directory or a root (then its :func:`latest`). Collective when a
    process group is up. Raises :class:`CheckpointError` naming each missing table and each shape
    mismatch, before anything is written. With ``strict=False`` keys missing on either side are
    skipped (shapes are still checked).
    """
    ckpt = _resolve(path)
    sidecar = read_sidecar(ckpt)
    metadata = read_metadata_file(ckpt)
    target: dict[str, Any] = dict(sharded_state_dict(model, pg, copy=True))
    expected = state_shapes(target)
    has_fused = bool(target.get("optim"))
    sections = ("model", "optim") if has_fused else ("model",)
    if not has_fused:
        target.pop("optim", None)
    found: dict[str, tuple[int, ...]] = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            for section in sections:
                if key.startswith(f"{section}."):
                    found[key[len(section) + 1 :]] = tuple(md.size)
    # A table data-parallel when saved had no fused state: under a fused sharding now, its state
    # starts fresh. A table data-parallel now takes no fused state: what was saved is left out.
    was_dense = set(sidecar.get("dense_tables", []))
    now_dense = set(_dense_tables(model))
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
                k: v
                for k, v in target[section].items()
                if f"{section}.{k}" in metadata.state_dict_metadata
            }
    dense_plan = _dense_targets(sidecar, metadata.state_dict_metadata, model, optimizer)
    if dense_plan is not None:
        target[_DENSE] = dense_plan
    with quiet_sharded_tensor():
        dcp_load(
            target,
            storage_reader=SafeFileSystemReader(ckpt),
            process_group=pg,
            no_dist=not _dist_on(pg),
        )
    load_sharded_state_dict(
        model,
        {k: v for k, v in target.items() if k in ("model", "optim")},
        strict=False,  # checked above against the checkpoint as a whole
    )
    if optimizer is not None and dense_plan is not None:
        _load_dense(model, optimizer, sidecar["dense_optimizer"], dense_plan)
    return int(sidecar["step"])


def _dense_targets(
    sidecar: Mapping[str, Any],
    md: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, torch.Tensor] | None:
    if optimizer is None:
        return None
    if sidecar.get("dense_optimizer") is None:
        raise CheckpointError(
            "the checkpoint holds no dense optimizer state, but an optimizer was given"
        )
    names = param_names(model)
    current = {names.get(id(p)) for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, torch.Tensor] = {}
    prefix = f"{_DENSE}."
    for key, entry in md.items():
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata):
            inner = key[len(prefix) :]
            if inner.rpartition(".")[0] in current:
                out[inner] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    return out


def _load_dense(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Parameters are matched by name: state of a parameter the checkpoint lacks stays fresh (a
    table that was not data-parallel when saved), and saved state of a parameter this model lacks
    is left out (a table that is no longer data-parallel). Group ``i`` takes saved group ``i``'s
    hyper-parameters."""
    names = param_names(model)
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the optimizer has {len(optimizer.param_groups)} parameter group(s), the "
            f"checkpoint's had {len(meta['param_groups'])}"
        )
    current = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    index = {fqn: i for i, fqn in enumerate(current) if fqn is not None}
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        fqn, _, name = key.rpartition(".")
        if fqn in index:
            state.setdefault(index[fqn], {})[name] = tensor
    for fqn, values in meta.get("scalars", {}).items():
        if fqn in index:
            state.setdefault(index[fqn], {}).update(values)
    groups = []
    flat = 0
    for group, live in zip(meta["param_groups"], optimizer.param_groups, strict=True):
        entry = {k: v for k, v in group.items() if k != "params"}
        for k, v in live.items():
            if isinstance(v, tuple) and isinstance(entry.get(k), list):
                entry[k] = tuple(entry[k])
        entry["params"] = list(range(flat, flat + len(live["params"])))
        flat += len(live["params"])
        groups.append(entry)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
