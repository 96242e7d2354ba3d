"""The fused, table-batched embedding lookup and the optimizers fused into its backward.

Backends: ``torch`` (pure PyTorch, CPU and CUDA) and ``fbgemm`` (FBGEMM's table-batched kernel,
when importable). Choose with the ``backend=`` argument or ``$SHARDREC_KERNEL_BACKEND``
(``torch``, ``fbgemm``, ``auto``). :func:`set_learning_rate` changes the fused optimizers' learning
rate in every lookup of a model (plain or ``DistributedModelParallel``), e.g. for a schedule.

Storage backends (:mod:`shardrec.kernels.storage`) are the plugin hook below the sharders: a
table's ``StorageChoice`` names the :class:`StorageBackend` that stores it and runs its fused
lookup-and-update under any sharding. ``torch`` and ``fbgemm`` are the built-in ones; a backend
that only changes where rows live builds a :class:`TorchGroup` with its own :class:`RowAllocator`.
"""

from shardrec.kernels.group import GroupInput, LookupGroup
from shardrec.kernels.input_checks import BadBatchError, BatchChecker
from shardrec.kernels.learning_rate import fused_learning_rates, set_learning_rate
from shardrec.kernels.specs import (
    BACKEND_ENV_VAR,
    DataType,
    FeatureSpec,
    FusedOptimizerConfig,
    KernelBackend,
    OptimizerType,
    PoolingType,
    StorageChoice,
    TableSpec,
    parse_optimizer,
)
from shardrec.kernels.storage import (
    IN_MEMORY,
    DeclaresStorageMemory,
    GroupRequest,
    StorageBackend,
    StorageMemory,
    UnknownStorageBackendError,
    storage_memory,
)
from shardrec.kernels.table_batched import TableBatchedEmbedding
from shardrec.kernels.torch_backend import RowAllocator, TorchGroup, allocate_in_memory

__all__ = [
    "BACKEND_ENV_VAR",
    "IN_MEMORY",
    "BadBatchError",
    "BatchChecker",
    "DataType",
    "DeclaresStorageMemory",
    "FeatureSpec",
    "FusedOptimizerConfig",
    "GroupInput",
    "GroupRequest",
    "KernelBackend",
    "LookupGroup",
    "OptimizerType",
    "PoolingType",
    "RowAllocator",
    "StorageBackend",
    "StorageChoice",
    "StorageMemory",
    "TableBatchedEmbedding",
    "TableSpec",
    "TorchGroup",
    "UnknownStorageBackendError",
    "allocate_in_memory",
    "fused_learning_rates",
    "parse_optimizer",
    "set_learning_rate",
    "storage_memory",
]
