"""The fused, table-batched embedding lookup and the optimizers fused into its backward.

Backends: ``torch`` (pure PyTorch, CPU and CUDA) and ``fbgemm`` (FBGEMM's table-batched kernel,
when importable). Choose with the ``backend=`` argument or ``$SHARDREC_KERNEL_BACKEND``
(``torch``, ``fbgemm``, ``auto``). :func:`set_learning_rate` changes the fused optimizers' learning
rate in every lookup of a model (plain or ``DistributedModelParallel``), e.g. for a schedule.
"""

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
    TableSpec,
)
from shardrec.kernels.table_batched import TableBatchedEmbedding

__all__ = [
    "BACKEND_ENV_VAR",
    "BadBatchError",
    "BatchChecker",
    "DataType",
    "FeatureSpec",
    "FusedOptimizerConfig",
    "KernelBackend",
    "OptimizerType",
    "PoolingType",
    "TableBatchedEmbedding",
    "TableSpec",
    "fused_learning_rates",
    "set_learning_rate",
]
