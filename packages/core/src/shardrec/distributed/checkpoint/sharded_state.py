"""Sharded state dicts: the unsharded keys, with values that are this rank's part of each table.

``sharded_state_dict(model)`` gives ``{"model": {...}, "optim": {...}}``:

- ``model``: every key of the unsharded model (``sparse.ebc.embedding_bags.t0.weight``...). A
  sharded table's value is a ``ShardedTensor`` whose global metadata lists every rank's shards
  (offsets, sizes, rank: any placement, uneven rows or columns); a replicated (data-parallel) table
  and every dense parameter or buffer is a plain tensor.
- ``optim``: the fused optimizer state of each table, ``<weight key>.<state name>`` (``sum`` of
  Adagrad, ``exp_avg``/``exp_avg_sq`` of Adam), sharded like its table. A row-wise state (one value
  per row) is 1-D; when column shards of one table each hold a copy of it, the copy of the first
  column shard stands for all of them. A per-table scalar (Adam's ``step``) is a plain 0-d tensor,
  the same on every rank (ranks without a shard of the table get the holders' value).

ShardedTensor rather than DTensor: a plan places shards on arbitrary ranks with uneven sizes (a
table on rank 3 alone, rows 0-4 on rank 1 and 5-6 on rank 0), which a ShardedTensor describes
directly. torch.distributed.checkpoint reshards between any two such layouts and plain tensors.

``load_sharded_state_dict(model, state)`` copies values back into this rank's shards, from
ShardedTensors (any layout: only the overlap with local shards is read) or full plain tensors. It
checks every key and shape first and changes nothing if one is wrong; after the copies it calls
``state_loaded()`` on every module that has it (:mod:`.loaded`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardrec.distributed.checkpoint.box_copy import Copy, box_copies, is_sharded
from shardrec.distributed.checkpoint.errors import CheckpointError
from shardrec.distributed.checkpoint.loaded import notify_state_loaded
from shardrec.distributed.sharding.state_dict import table_key_prefix
from shardrec.distributed.types import LocalShard, ShardedEmbeddingModule, TableShards

StateValue = Any  # torch.Tensor or ShardedTensor


@contextmanager
def quiet_sharded_tensor() -> Iterator[None]:
    """Silence DCP's notes on choices made knowingly: ShardedTensor (see module doc), no process
    group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
        # Single-process use of DCP is intended here, not a forgotten init_process_group.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled.*")
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedModelParallel / DistributedDataParallel wrappers."""
    seen = 0
    while seen < 8 and (
        isinstance(model, nn.parallel.DistributedDataParallel)
        or type(model).__name__ == "DistributedModelParallel"
    ):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
        seen += 1
    return model


@dataclass(frozen=True, slots=True)
class ShardedTable:
    """One table of one sharded module, as this rank holds it."""

    key: str  # the unsharded weight key
    shards: TableShards


def sharded_tables(model: nn.Module) -> tuple[list[ShardedTable], list[str]]:
    """Every sharded table of ``model`` and the paths of the sharded modules that hold them."""
    root = unwrap(model)
    tables: list[ShardedTable] = []
    owners: list[str] = []
    for path, module in root.named_modules():
        if any(o == "" or path.startswith(o + ".") for o in owners):
            continue
        if isinstance(module, ShardedEmbeddingModule) and not isinstance(module, nn.ModuleDict):
            owners.append(path)
            prefix = table_key_prefix(root.get_submodule(path) if path else root)
            held = module.local_table_shards()
        else:
            found = _unsharded_collection(module)
            if found is None:
                continue
            owners.append(path)
            prefix, held = found
        for table, shards in held.items():
            key = ".".join(p for p in (path, prefix, table, "weight") if p)
            tables.append(ShardedTable(key, shards))
    return tables, owners


def _unsharded_collection(module: nn.Module) -> tuple[str, dict[str, TableShards]] | None:
    """An unsharded EBC/EC seen as one replicated shard per table, so its fused optimizer state
    travels with its weights (a sharded checkpoint then loads into it whole)."""
    from shardrec.modules import EmbeddingBagCollection, EmbeddingCollection

    if isinstance(module, EmbeddingBagCollection):
        prefix = "embedding_bags"
    elif isinstance(module, EmbeddingCollection):
        prefix = "embeddings"
    else:
        return None
    lookup = module.lookup
    states = lookup.optimizer_states()
    out: dict[str, TableShards] = {}
    for name, weight in lookup.table_weights().items():
        out[name] = TableShards(
            weight=[LocalShard(weight, (0, 0), tuple(weight.shape))],
            optimizer_state={
                state: [LocalShard(t, (0,) * t.dim(), tuple(t.shape))]
                for state, t in states.get(name, {}).items()
            },
            replicated=True,
        )
    return prefix, out


def _owned(key: str, owners: list[str]) -> bool:
    return any(o == "" or key.startswith(o + ".") for o in owners)


def _state_shards(table: ShardedTable, name: str) -> list[LocalShard]:
    """The shards of state ``name`` that carry distinct values (row-wise copies of column shards
    dropped)."""
    shards = table.shards.optimizer_state[name]
    weights = table.shards.weight
    if len(shards) != len(weights):
        return list(shards)
    return [
        s
        for s, w in zip(shards, weights, strict=True)
        if len(s.offsets) == len(w.offsets) or w.offsets[1] == 0
    ]


def _rank_of(pg: dist.ProcessGroup | None) -> tuple[int, int]:
    if pg is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(pg), dist.get_world_size(pg)


def _to_sharded_tensor(
    local: list[LocalShard],
    everyone: list[list[_Box]],
    dtype: torch.dtype,
    global_shape: tuple[int, ...],
    pg: dist.ProcessGroup | None,
    rank: int,
) -> StateValue:
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )
    from torch.distributed._shard.sharded_tensor.shard import Shard

    metas = [
        ShardMetadata(list(offsets), list(sizes), f"rank:{r}/{device}")
        for r, shards in enumerate(everyone)
        for offsets, sizes, device in shards
    ]
    mine = [
        Shard(
            s.tensor.detach(),
            ShardMetadata(list(s.offsets), list(s.tensor.shape), f"rank:{rank}/{s.tensor.device}"),
        )
        for s in local
    ]
    gmeta = ShardedTensorMetadata(metas, torch.Size(global_shape), TensorProperties(dtype=dtype))
    with quiet_sharded_tensor():
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            mine, gmeta, process_group=pg
        )


def sharded_state_dict(
    model: nn.Module, pg: dist.ProcessGroup | None = None, *, copy: bool = False
) -> dict[str, dict[str, StateValue]]:
    """``{"model": ..., "optim": ...}`` of ``model`` on this rank.

    A collective when a process group is up: every rank calls it. Every rank gets every key, also
    for tables it holds no shard of (a ShardedTensor with no local shards). Values share storage
    with the model unless ``copy`` (then they are fresh tensors: a target to load into safely).
    """
    return _state_dict(model, pg, copy=copy, for_load=copy)


def load_target(
    model: nn.Module, pg: dist.ProcessGroup | None = None, *, in_place: bool = False
) -> dict[str, dict[str, StateValue]]:
    """The state a load reads into: fresh tensors (``sharded_state_dict(copy=True)``), or with
    ``in_place`` the model's own tensors, so that no second copy of the state is ever held. Either
    way, a rank holding a column slice's copy of a row-wise state that another slice saves gets a
    fresh whole vector to read it into (copied into its slice by :func:`load_sharded_state_dict`).
    A collective, like :func:`sharded_state_dict`."""
    return _state_dict(model, pg, copy=not in_place, for_load=True)


def _state_dict(
    model: nn.Module, pg: dist.ProcessGroup | None, *, copy: bool, for_load: bool
) -> dict[str, dict[str, StateValue]]:
    def take(t: torch.Tensor) -> torch.Tensor:
        # A plugin's module (the managed buckets) may hold ShardedTensors: chosen knowingly.
        with quiet_sharded_tensor():
            return t.detach().clone() if copy else t.detach()

    root = unwrap(model)
    tables, owners = sharded_tables(root)
    rank, world = _rank_of(pg)
    out: dict[str, dict[str, StateValue]] = {
        "model": {
            k: take(v) for k, v in root.state_dict(keep_vars=False).items() if not _owned(k, owners)
        },
        "optim": {},
    }
    # What each rank holds of each sharded key, gathered once for all tables and states:
    # key -> (section, dtype name, global shape, [(offsets, sizes)]).
    mine: dict[str, _Holding] = {}
    local: dict[str, list[LocalShard]] = {}
    # Row-wise states of column-sliced tables: each slice keeps the mean of g² over its own
    # columns, so the unsharded table's state is their column-weighted mean (reduced below).
    sliced: dict[str, list[tuple[LocalShard, LocalShard]]] = {}
    # Per-table scalar states of sharded tables: key -> (dtype name, value), gathered so that every
    # rank saves (and loads) the same plain tensor.
    scalars: dict[str, tuple[str, float | int]] = {}
    for t in tables:
        entries = [(t.key, list(t.shards.weight), "model")]
        entries += [
            (f"{t.key}.{name}", _state_shards(t, name), "optim")
            for name in t.shards.optimizer_state
        ]
        for key, shards, section in entries:
            every = (
                t.shards.optimizer_state.get(key.rpartition(".")[2], [])
                if section == "optim"
                else shards
            )
            if section == "optim" and every and all(s.tensor.dim() == 0 for s in every):
                out[section][key] = take(every[0].tensor)
                if not t.shards.replicated:
                    scalar_t = every[0].tensor
                    scalars[key] = (str(scalar_t.dtype).removeprefix("torch."), scalar_t.item())
                continue
            if for_load and section == "optim" and len(shards) < len(every):
                # This rank holds a copy of a row-wise state that another column shard saves: load
                # the whole vector here (a ShardedTensor cannot hold two copies of the same rows).
                full = every[0]
                out[section][key] = torch.zeros(
                    full.global_shape, dtype=full.tensor.dtype, device=full.tensor.device
                )
                continue
            if t.shards.replicated:
                if not shards:
                    raise CheckpointError(f"{key}: replicated table without a local copy")
                out[section][key] = take(shards[0].tensor)
                continue
            if not shards and not every:
                continue
            if not for_load and section == "optim" and _column_sliced_rowwise(t, every):
                sliced[key] = [(st, w) for st, w in zip(every, t.shards.weight, strict=True)]
            if not shards:
                continue
            dtype = _agreed_dtype(key, shards)
            mine[key] = (
                section,
                str(dtype).removeprefix("torch."),
                tuple(shards[0].global_shape),
                [(tuple(s.offsets), tuple(s.tensor.shape), str(s.tensor.device)) for s in shards],
            )
            local[key] = shards
    payloads: list[_Payload] = [(mine, sorted(sliced), scalars)]
    if world > 1:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, payloads[0], group=pg)
        payloads = everyone
    gathered = [p[0] for p in payloads]
    for key in sorted({k for p in payloads for k in p[2]}):
        values = {p[2][key] for p in payloads if key in p[2]}
        if len(values) != 1:
            raise CheckpointError(f"{key}: ranks hold different values of this scalar: {values}")
        if key not in out["optim"]:
            dtype_name, number = values.pop()
            out["optim"][key] = torch.tensor(number, dtype=getattr(torch, dtype_name))
    for key in sorted({k for p in payloads for k in p[1]}):
        shape = next(g[key][2] for g in gathered if key in g)
        local[key] = _weighted_rowwise(key, shape, sliced.get(key, []), local.get(key, []), pg)
    keys = sorted({k for g in gathered for k in g})
    for key in keys:
        held = [g.get(key) for g in gathered]
        infos = {(h[0], h[1], h[2]) for h in held if h is not None}
        if len(infos) != 1:
            raise CheckpointError(f"{key}: ranks disagree on its section/dtype/shape: {infos}")
        section, dtype_name, shape = infos.pop()
        if key in out[section]:
            continue  # this rank loads a whole row-wise copy (see above)
        boxes = [h[3] if h is not None else [] for h in held]
        value = _to_sharded_tensor(
            [LocalShard(take(x.tensor), x.offsets, x.global_shape) for x in local.get(key, [])],
            boxes,
            getattr(torch, dtype_name),
            shape,
            pg,
            rank,
        )
        out[section][key] = value
    return out


def _column_sliced_rowwise(table: ShardedTable, states: list[LocalShard]) -> bool:
    weights = table.shards.weight
    return (
        bool(states)
        and len(states) == len(weights)
        and all(len(s.offsets) == 1 for s in states)
        and any(int(w.tensor.shape[1]) < int(w.global_shape[1]) for w in weights)
    )


def _weighted_rowwise(
    key: str,
    shape: tuple[int, ...],
    slices: list[tuple[LocalShard, LocalShard]],
    kept: list[LocalShard],
    pg: dist.ProcessGroup | None,
) -> list[LocalShard]:
    """The column-weighted mean of every slice's row-wise state (a collective over ``pg``), cut to
    the shards this rank saves."""
    device = slices[0][0].tensor.device if slices else torch.device("cpu")
    if dist.is_available() and dist.is_initialized() and pg is not None:
        backend = dist.get_backend(pg)
        if backend == "nccl" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            device = torch.device("cpu")
    total = torch.zeros(shape, dtype=torch.float64, device=device)
    for state, weight in slices:
        frac = int(weight.tensor.shape[1]) / int(weight.global_shape[1])
        rows = state.tensor.shape[0]
        total[state.offsets[0] : state.offsets[0] + rows] += frac * state.tensor.to(device)
    if _rank_of(pg)[1] > 1:
        dist.all_reduce(total, group=pg)
    return [
        LocalShard(
            total[s.offsets[0] : s.offsets[0] + s.tensor.shape[0]].to(
                s.tensor.device, s.tensor.dtype
            ),
            s.offsets,
            s.global_shape,
        )
        for s in kept
    ]


_Box = tuple[tuple[int, ...], tuple[int, ...], str]  # offsets, sizes, device
_Holding = tuple[str, str, tuple[int, ...], list[_Box]]
_Payload = tuple[dict[str, _Holding], list[str], dict[str, tuple[str, float | int]]]


def _agreed_dtype(key: str, shards: list[LocalShard]) -> torch.dtype:
    dtype = shards[0].tensor.dtype if shards else torch.float32
    for s in shards:
        if s.tensor.dtype != dtype:
            raise CheckpointError(
                f"{key}: local shards disagree on dtype ({s.tensor.dtype} vs {dtype})"
            )
    return dtype


def _global_shape(value: StateValue) -> tuple[int, ...]:
    return tuple(int(d) for d in value.size())


def _expected(
    model: nn.Module, pg: dist.ProcessGroup | None
) -> tuple[list[ShardedTable], list[str], dict[str, torch.Tensor]]:
    root = unwrap(model)
    tables, owners = sharded_tables(root)
    dense = {k: v for k, v in root.state_dict().items() if not _owned(k, owners)}
    return tables, owners, dense


def expected_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (global shape, section) of everything a checkpoint of ``model`` holds."""
    tables, _, dense = _expected(model, None)
    out: dict[str, tuple[tuple[int, ...], str]] = {
        k: (tuple(v.shape), "model") for k, v in dense.items()
    }
    for t in tables:
        if t.shards.weight:
            out[t.key] = (tuple(t.shards.weight[0].global_shape), "model")
        for name, shards in t.shards.optimizer_state.items():
            if shards:
                out[f"{t.key}.{name}"] = (tuple(shards[0].global_shape), "optim")
    return out


def state_shapes(
    state: Mapping[str, Mapping[str, StateValue]],
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (global shape, section) of a state built by :func:`sharded_state_dict`."""
    with quiet_sharded_tensor():
        return {
            key: (_global_shape(value), section)
            for section, part in state.items()
            for key, value in part.items()
        }


def _table_name(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else key


def check_shapes(
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    found: Mapping[str, tuple[int, ...]],
    where: str,
    sections: tuple[str, ...] = ("model", "optim"),
    strict: bool = True,
) -> None:
    """Raise CheckpointError naming every missing key or shape mismatch (tables named first)."""
    problems: list[str] = []
    for key, (shape, section) in expected.items():
        if section not in sections:
            continue
        if key not in found:
            if strict:
                problems.append(f"{key} (table {_table_name(key)!r}) is missing from {where}")
        elif tuple(found[key]) != tuple(shape):
            problems.append(
                f"{key} (table {_table_name(key)!r}): {where} has shape {tuple(found[key])}, "
                f"the model has {tuple(shape)}"
            )
    if strict:
        wanted = {k for k, (_, s) in expected.items() if s in sections}
        extra = sorted(k for k in found if k not in wanted and _section_of(k, expected) in sections)
        problems += [f"{k} is in {where} but not in the model" for k in extra]
    if problems:
        raise CheckpointError(
            f"{where} does not match the model ({len(problems)} problem(s)); "
            "nothing was loaded:\n  " + "\n  ".join(problems)
        )


def _section_of(key: str, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> str:
    for suffix in (".sum", ".exp_avg", ".exp_avg_sq", ".step"):
        if key.endswith(suffix) and key[: -len(suffix)] in expected:
            return "optim"
    return "model"


def load_sharded_state_dict(
    model: nn.Module,
    state: Mapping[str, Mapping[str, StateValue]] | Mapping[str, StateValue],
    *,
    strict: bool = True,
) -> None:
    """Copy ``state`` (sharded or full tensors) into ``model``'s local shards and dense tensors.

    ``state`` is ``{"model": ..., "optim": ...}`` or a flat model state dict (no optimizer state).
    Every key and shape is checked before anything is written. Once every value is in, each
    module of ``model`` that implements :class:`~.loaded.StateLoaded` is told so.
    """
    if "model" in state and isinstance(state["model"], Mapping):
        model_part: Mapping[str, StateValue] = state["model"]
        optim_obj = state.get("optim", {})
        optim_part: Mapping[str, StateValue] = optim_obj if isinstance(optim_obj, Mapping) else {}
        sections: tuple[str, ...] = ("model", "optim") if optim_part else ("model",)
    else:
        model_part = state
        optim_part = {}
        sections = ("model",)
    tables, _, dense = _expected(model, None)
    with quiet_sharded_tensor():
        _load_checked(model_part, optim_part, sections, tables, dense, strict)
    notify_state_loaded(model)


def _load_checked(
    model_part: Mapping[str, StateValue],
    optim_part: Mapping[str, StateValue],
    sections: tuple[str, ...],
    tables: list[ShardedTable],
    dense: Mapping[str, torch.Tensor],
    strict: bool,
) -> None:
    # A table this rank holds no shard of has no local shape to check: the given value's shape
    # stands in (nothing is written for it here).
    expected: dict[str, tuple[tuple[int, ...], str]] = {
        k: (tuple(v.shape), "model") for k, v in dense.items()
    }
    for t in tables:
        parts = [(t.key, list(t.shards.weight), "model", model_part)]
        parts += [
            (f"{t.key}.{n}", list(sh), "optim", optim_part)
            for n, sh in t.shards.optimizer_state.items()
        ]
        for key, shards, section, given in parts:
            if shards:
                expected[key] = (tuple(shards[0].global_shape), section)
            elif key in given:
                expected[key] = (_global_shape(given[key]), section)
            else:
                expected[key] = ((-1,), section)  # reported missing if this section is loaded
    found = {k: _global_shape(v) for k, v in {**model_part, **optim_part}.items()}
    check_shapes(expected, found, "the state dict", sections, strict)

    writes: list[Copy] = []  # planned (and checked) in full before the first copy
    for key, tensor in dense.items():
        if key in model_part and is_sharded(tensor):
            # State a module keeps on some ranks only (a managed table's buckets): each rank
            # writes the pieces it holds.
            held: Any = tensor
            for shard in held.local_shards():
                offsets = tuple(shard.metadata.shard_offsets)
                writes += box_copies(shard.tensor, model_part[key], offsets, key)
        elif key in model_part:
            writes += box_copies(tensor, model_part[key], (0,) * tensor.dim(), key)
    for t in tables:
        if t.key in model_part:
            for s in t.shards.weight:
                writes += box_copies(s.tensor, model_part[t.key], s.offsets, t.key)
        for name, shards in t.shards.optimizer_state.items():
            key = f"{t.key}.{name}"
            if key in optim_part:
                for s in shards:
                    writes += box_copies(s.tensor, optim_part[key], s.offsets, key)
    with torch.no_grad():
        for dst, src in writes:
            dst.copy_(src)
