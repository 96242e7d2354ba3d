"""The fused, table-batched embedding lookup and the optimizers fused into its backward.

Backends: ``torch`` (pure PyTorch, CPU and CUDA) and ``fbgemm`` (FBGEMM's table-batched kernel,
when importable). Choose with the ``backend=`` argument or ``$SHARDREC_KERNEL_BACKEND``
(``torch``, ``fbgemm``, ``auto``).
"""

from shardrec.kernels.specs import (
    BACKEND_ENV_VAR,
    DataType,
    FeatureSpec,
    FusedOptimizerConfig,
    KernelBackend,
    OptimizerType,
    PoolingType,
    TableSpec,
)
from shardrec.kernels.table_batched import TableBatchedEmbedding

__all__ = [
    "BACKEND_ENV_VAR",
    "DataType",
    "FeatureSpec",
    "FusedOptimizerConfig",
    "KernelBackend",
    "OptimizerType",
    "PoolingType",
    "TableBatchedEmbedding",
    "TableSpec",
]
