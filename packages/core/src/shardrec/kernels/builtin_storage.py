"""The built-in storage backends, ``torch`` and ``fbgemm``: a plugin like any other.

Every plugin manager registers this module before the entry points (so these two need no
installation and cannot be filtered out); it offers its backends through the same hook a third
party implements.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Final

import torch

from shardrec import ops
from shardrec.distributed.hookspecs import RegisterStorageBackend, hookimpl
from shardrec.kernels.fbgemm_backend import FbgemmGroup
from shardrec.kernels.group import LookupGroup
from shardrec.kernels.specs import KernelBackend, PoolingType, TableSpec
from shardrec.kernels.storage import IN_MEMORY, GroupRequest, StorageMemory
from shardrec.kernels.torch_backend import TorchGroup

__all__ = ["PLUGIN_NAME", "FbgemmStorage", "TorchStorage", "shardrec_register_storage_backends"]

PLUGIN_NAME: Final = "shardrec-builtin-storage"


def _unknown_options(request: GroupRequest, backend: str) -> str | None:
    if request.options:
        return f"the {backend} backend takes no options, got {sorted(request.options)}"
    return None


class TorchStorage:
    """Pure PyTorch (CPU and CUDA): tables of one data type and dim share one tensor."""

    @property
    def name(self) -> str:
        return KernelBackend.TORCH.value

    def memory(self, options: Mapping[str, str]) -> StorageMemory:
        return IN_MEMORY  # rows and optimizer state are tensors on the rank's device

    def group_key(self, table: TableSpec, pooled: bool) -> Hashable:
        return (table.data_type, table.embedding_dim)

    def unsupported_reason(self, request: GroupRequest) -> str | None:
        return _unknown_options(request, self.name)

    def build_group(self, request: GroupRequest) -> LookupGroup:
        return TorchGroup(
            tables=request.tables,
            feature_tables=request.feature_tables,
            optimizer=request.optimizer,
            device=request.device,
            deferred_update=request.deferred_update,
        )


class FbgemmStorage:
    """FBGEMM's table-batched kernel: tables of one data type and pooling mode in one module."""

    @property
    def name(self) -> str:
        return KernelBackend.FBGEMM.value

    def memory(self, options: Mapping[str, str]) -> StorageMemory:
        return IN_MEMORY  # rows and optimizer state are tensors on the rank's device

    def group_key(self, table: TableSpec, pooled: bool) -> Hashable:
        pooling = table.pooling if pooled else PoolingType.NONE
        return (table.data_type, pooling, 0 if pooled else table.embedding_dim)

    def unsupported_reason(self, request: GroupRequest) -> str | None:
        unknown = _unknown_options(request, self.name)
        if unknown is not None:
            return unknown
        if request.deferred_update:
            return "FBGEMM applies its optimizer only inside its own backward (no deferred update)"
        first = request.tables[0]
        # On meta nothing runs yet: ask about the CPU kernel, where a meta module is materialised.
        device = request.device if request.device.type != "meta" else torch.device("cpu")
        return ops.fbgemm_unsupported_reason(
            dims=[t.embedding_dim for t in request.tables],
            pooling=first.pooling if request.pooled else PoolingType.NONE,
            data_type=first.data_type,
            optimizer=request.optimizer,
            is_weighted=request.is_weighted,
            device=device,
        )

    def build_group(self, request: GroupRequest) -> LookupGroup:
        if request.optimizer is None:  # unsupported_reason refuses it first
            raise ValueError("the fbgemm backend needs a fused optimizer")
        first = request.tables[0]
        return FbgemmGroup(
            tables=request.tables,
            feature_tables=request.feature_tables,
            pooling=first.pooling if request.pooled else PoolingType.NONE,
            optimizer=request.optimizer,
            device=request.device,
        )


@hookimpl
def shardrec_register_storage_backends(register: RegisterStorageBackend) -> None:
    register(TorchStorage())
    register(FbgemmStorage())
