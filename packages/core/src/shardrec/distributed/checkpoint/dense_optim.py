"""A torch optimizer's state in a checkpoint: tensors keyed ``<parameter name>.<state>``, the rest
(hyper-parameters, scalar states) in the sidecar's JSON.

Parameters are matched by name, so the state follows a parameter to any plan. A data-parallel
table's weight is named by its unsharded key, so its state follows it to any plan where the table
is data-parallel again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from shardrec.distributed.checkpoint.errors import CheckpointError
from shardrec.distributed.checkpoint.sharded_state import sharded_tables, unwrap

DENSE: Final = "dense_optim"


def param_names(model: nn.Module) -> dict[int, str]:
    """``id(param)`` -> its name; a data-parallel table's weight is named by its unsharded key."""
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


def dense_tables(model: nn.Module) -> list[str]:
    """Tables trained by a torch optimizer (data-parallel: replicated, no fused state)."""
    tables, _ = sharded_tables(unwrap(model))
    return sorted(t.key for t in tables if t.shards.replicated and not t.shards.optimizer_state)


def dense_optimizer_state(
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


def dense_targets(
    where: Path,
    sidecar: Mapping[str, Any],
    entries: Mapping[str, TensorStorageMetadata],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, torch.Tensor] | None:
    """Empty tensors for DCP to read the optimizer's saved state into, one per saved state of a
    parameter of ``optimizer``. Each declared shape is checked against its parameter before
    anything is allocated: a state has at most the parameter's dimensions and elements (a
    scalar such as ``step``, a per-element moment, or a factor of one)."""
    if optimizer is None:
        return None
    meta = sidecar.get("dense_optimizer")
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{where}: the checkpoint holds no dense optimizer state, but an optimizer was given"
        )
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{where / 'shardrec.json'}: malformed dense optimizer groups")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{where}: the optimizer has {len(optimizer.param_groups)} parameter group(s), the "
            f"checkpoint's had {len(groups)}"
        )
    if not isinstance(meta.get("scalars", {}), dict):
        raise CheckpointError(f"{where / 'shardrec.json'}: malformed dense optimizer scalars")
    names = param_names(model)
    current = {
        names[id(p)]: p
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) in names
    }
    out: dict[str, torch.Tensor] = {}
    prefix = f"{DENSE}."
    for key, entry in entries.items():
        if not key.startswith(prefix):
            continue
        inner = key[len(prefix) :]
        param = current.get(inner.rpartition(".")[0])
        if param is None:
            continue
        size = tuple(entry.size)
        if len(size) > max(param.dim(), 0) or math.prod(size) > max(param.numel(), 1):
            raise CheckpointError(
                f"{where / '.metadata'}: optimizer state {inner!r} declares shape {size}, which "
                f"does not fit its parameter's shape {tuple(param.shape)}"
            )
        out[inner] = torch.empty(size, dtype=entry.properties.dtype)
    return out


def load_dense(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Parameters are matched by name: state of a parameter the checkpoint lacks stays fresh (a
    table that was not data-parallel when saved), and saved state of a parameter this model lacks
    is left out (a table that is no longer data-parallel). Group ``i`` takes saved group ``i``'s
    hyper-parameters (the group count was checked by :func:`dense_targets`)."""
    names = param_names(model)
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
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the checkpoint's dense optimizer state does not fit this optimizer ({exc})"
        ) from None
