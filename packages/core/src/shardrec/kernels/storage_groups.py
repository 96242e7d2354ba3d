"""How a lookup's tables are split into groups, each stored by its table's storage backend.

A table without a :class:`~shardrec.kernels.StorageChoice` gets the lookup's default backend
(``torch`` or ``fbgemm``, resolved from ``backend=``: ``auto`` takes FBGEMM when it can run every
such table and is the faster kernel for the lookup's optimizer on its device, see
:func:`resolve_default_backend`); a table with one gets the backend it names. Within one backend
(and one set of its options), the backend's ``group_key`` decides which tables share a group.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import torch

from shardrec import ops
from shardrec.kernels.group import LookupGroup
from shardrec.kernels.specs import (
    FusedOptimizerConfig,
    KernelBackend,
    OptimizerType,
    PoolingType,
    StorageChoice,
    TableSpec,
)
from shardrec.kernels.storage import GroupRequest, StorageBackend, UnknownStorageBackendError
from shardrec.kernels.torch_backend import TorchGroup

__all__ = ["BuiltGroup", "build_groups", "resolve_default_backend"]

#: Fused rules whose pure-torch CPU update (``shardrec.kernels.cpu_update``) beats FBGEMM's CPU
#: kernel. Measured (docs/benchmarks.md, "Which backend auto picks"): exact Adagrad's step is
#: 1.5-1.7x FBGEMM's, at MLPerf's multi-hot shapes and at the demo's single-hot dim-16 ones; SGD
#: and row-wise Adagrad are faster on FBGEMM (0.6-0.85x without it). FBGEMM's CPU kernel has no
#: Adam, so Adam takes the torch backend anyway.
TORCH_FASTER_ON_CPU: Final[frozenset[OptimizerType]] = frozenset({OptimizerType.EXACT_ADAGRAD})


@dataclass(frozen=True, slots=True)
class BuiltGroup:
    """One group, the lookup's indices of its tables and of its features (both ascending)."""

    group: LookupGroup
    backend: str
    table_ids: list[int]
    feature_ids: list[int]


def _backend(name: str, table: str, given: Mapping[str, StorageBackend] | None) -> StorageBackend:
    if given is not None:
        found = given.get(name)
        if found is None:
            raise UnknownStorageBackendError(table, name, list(given))
        return found
    # The plugin manager lives above the kernels; it is asked only when a lookup is built.
    from shardrec.distributed.plugins import find_storage_backend

    return find_storage_backend(name, table=table)


def build_groups(
    *,
    tables: Sequence[TableSpec],
    feature_table: Sequence[int],
    pooled: bool,
    is_weighted: bool,
    optimizer: FusedOptimizerConfig | None,
    default_backend: KernelBackend,
    device: torch.device,
    deferred_update: bool,
    storage_backends: Mapping[str, StorageBackend] | None,
) -> list[BuiltGroup]:
    """The groups of a lookup: tables keyed by (backend, options, the backend's group key).

    ``feature_table[f]``: the index in ``tables`` of the table feature ``f`` reads.
    ``storage_backends``: name -> backend; None asks the plugin manager. Raises ValueError naming
    the tables when a backend is unknown or cannot hold them.
    """
    keyed: dict[tuple[str, StorageChoice | None, Hashable], list[int]] = {}
    backends: dict[str, StorageBackend] = {}
    for t, spec in enumerate(tables):
        name = spec.storage.backend if spec.storage is not None else default_backend.value
        backend = backends.get(name)
        if backend is None:
            backend = backends[name] = _backend(name, spec.name, storage_backends)
        keyed.setdefault((name, spec.storage, backend.group_key(spec, pooled)), []).append(t)
    built: list[BuiltGroup] = []
    for (name, choice, _), table_ids in keyed.items():
        local = {t: i for i, t in enumerate(table_ids)}
        feats = [f for f, t in enumerate(feature_table) if t in local]
        request = GroupRequest(
            tables=tuple(tables[t] for t in table_ids),
            feature_tables=tuple(local[feature_table[f]] for f in feats),
            pooled=pooled,
            is_weighted=is_weighted,
            optimizer=optimizer,
            device=device,
            deferred_update=deferred_update,
            options=dict(choice.options) if choice is not None else {},
        )
        backend = backends[name]
        reason = backend.unsupported_reason(request)
        if reason is not None:
            raise ValueError(
                f"storage backend {name!r} cannot hold tables {request.table_names()}: {reason}"
            )
        group = backend.build_group(request)
        if deferred_update and not isinstance(group, TorchGroup):
            raise ValueError(
                f"storage backend {name!r} built a {type(group).__name__} for tables"
                f" {request.table_names()}, but a deferred update (a data-parallel replica) needs"
                " a TorchGroup (the backend's unsupported_reason should refuse deferred_update)"
            )
        built.append(BuiltGroup(group, name, table_ids, feats))
    return built


def resolve_default_backend(
    requested: KernelBackend,
    tables: Sequence[TableSpec],
    pooled: bool,
    is_weighted: bool,
    optimizer: FusedOptimizerConfig | None,
    device: torch.device,
) -> KernelBackend:
    """The backend of the tables without a storage choice: ``requested``, with ``auto`` resolved.

    ``auto`` is TORCH when there are no such tables, when FBGEMM cannot run all of them, and on
    CPU when the fused optimizer is one of :data:`TORCH_FASTER_ON_CPU` (exact Adagrad); else
    FBGEMM. On CUDA it is FBGEMM whenever FBGEMM can run the tables. A lookup on ``meta`` is
    asked about as on CPU, where a meta module is materialised. Both backends give the same
    results; the choice is only about speed.
    """
    defaults = [t for t in tables if t.storage is None]
    if requested is KernelBackend.TORCH or (requested is KernelBackend.AUTO and not defaults):
        return KernelBackend.TORCH
    probe_device = torch.device("cpu") if device.type == "meta" else device
    if (
        requested is KernelBackend.AUTO
        and probe_device.type == "cpu"
        and optimizer is not None
        and optimizer.optimizer in TORCH_FASTER_ON_CPU
    ):
        return KernelBackend.TORCH
    reasons: list[str] = []
    groups: dict[tuple[str, PoolingType], list[TableSpec]] = {}
    for t in defaults:
        mode = t.pooling if pooled else PoolingType.NONE
        groups.setdefault((t.data_type.value, mode), []).append(t)
    for (_, pooling), specs in groups.items():
        reason = ops.fbgemm_unsupported_reason(
            dims=[s.embedding_dim for s in specs],
            pooling=pooling,
            data_type=specs[0].data_type,
            optimizer=optimizer,
            is_weighted=is_weighted,
            device=probe_device,
        )
        if reason is not None:
            names = ", ".join(repr(s.name) for s in specs)
            reasons.append(f"tables {names}: {reason}")
    if not reasons:
        return KernelBackend.FBGEMM
    if requested is KernelBackend.FBGEMM:
        raise ValueError("the fbgemm backend cannot run this lookup: " + "; ".join(reasons))
    return KernelBackend.TORCH
