"""The ``mmap`` storage backend and the hook that registers it.

It changes only where rows live: each table is a :class:`shardrec.kernels.TorchGroup` (shardrec's
pure-torch lookup and fused optimizers) whose weight and optimizer state are memory-mapped files,
allocated by :class:`MmapAllocator`. So it works under every sharding type, with every fused
optimizer, and in a data-parallel replica.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
import torch.distributed as dist

from shardrec.distributed.hookspecs import RegisterStorageBackend, hookimpl
from shardrec.kernels import GroupRequest, LookupGroup, StorageMemory, TableSpec, TorchGroup
from shardrec_mmap_storage.files import file_name, map_rows

__all__ = ["BACKEND_NAME", "MmapAllocator", "MmapStorage", "shardrec_register_storage_backends"]

BACKEND_NAME: Final = "mmap"
_OPTIONS: Final = ("directory",)


def _rank() -> int:
    # Ranks of one machine may share the directory: each keeps its own shards' files.
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@dataclass(frozen=True, slots=True)
class MmapAllocator:
    """Allocates one table's tensors as files ``<table>.rank<r>.<what>.<rows>x<dim>.<dtype>``
    in ``directory`` (the rank and shape keep the shards of one table apart, in one process or
    several). A class, not a closure, so lookups holding it can be pickled and deep-copied (a
    copy's tensors are ordinary memory)."""

    directory: str
    table: str

    def __call__(
        self, what: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(shape, dtype=dtype, device=device)
        if device.type != "cpu":
            raise ValueError(
                f"table {self.table!r}: the mmap storage backend keeps rows in host files;"
                f" it cannot move them to {device}"
            )
        size = "x".join(str(n) for n in shape)
        kind = str(dtype).removeprefix("torch.")
        name = file_name(self.table, f"rank{_rank()}", what, size, kind)
        rows, fresh = map_rows(self.directory, name, shape, dtype)
        if not fresh and what != "weight":
            rows.zero_()  # optimizer state starts at zero; a kept file holds an old run's
        return rows


class MmapStorage:
    """Tables whose rows live in memory-mapped files under the table's ``directory`` option."""

    @property
    def name(self) -> str:
        return BACKEND_NAME

    def memory(self, options: Mapping[str, str]) -> StorageMemory:
        # Rows and optimizer state are file pages: the kernel's page cache holds the ones in use
        # and evicts them under pressure, so the planner need not fit them in the rank's memory.
        return StorageMemory(weights=False, optimizer_state=False)

    def group_key(self, table: TableSpec, pooled: bool) -> Hashable:
        # One group per table: its files are named after it.
        return table.name

    def unsupported_reason(self, request: GroupRequest) -> str | None:
        unknown = sorted(set(request.options) - set(_OPTIONS))
        if unknown:
            return f"unknown options {unknown}; it takes: {', '.join(_OPTIONS)}"
        directory = request.options.get("directory")
        if not directory:
            return "it needs the option 'directory' (where the table files go)"
        if not Path(directory).is_dir():
            return f"directory {directory!r} does not exist or is not a directory"
        if request.device.type not in ("cpu", "meta"):
            return f"it keeps rows in host files, not on {request.device}"
        return None

    def build_group(self, request: GroupRequest) -> LookupGroup:
        (table,) = request.tables
        return TorchGroup(
            tables=request.tables,
            feature_tables=request.feature_tables,
            optimizer=request.optimizer,
            device=request.device,
            deferred_update=request.deferred_update,
            allocate=MmapAllocator(request.options["directory"], table.name),
        )


@hookimpl
def shardrec_register_storage_backends(register: RegisterStorageBackend) -> None:
    register(MmapStorage())
