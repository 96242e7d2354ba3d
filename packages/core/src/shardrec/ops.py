"""The one typed wrapper around FBGEMM (``fbgemm_gpu``): nothing else in shardrec imports
``fbgemm_gpu``; the kernels (``shardrec.kernels``) call it through these functions.

FBGEMM is optional: every function here imports it lazily, and :func:`fbgemm_available` says
whether it can be imported (import blockers such as ``SHARDREC_HIDE_FBGEMM`` are honoured, because
the import itself is tried). The kernels' own types are imported inside the functions too: the
kernels package imports this module while it initialises, so an import of it here at module level
would be a cycle (``tools/check_import_cycles.py``).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from shardrec.kernels.specs import DataType, FusedOptimizerConfig, OptimizerType, PoolingType

__all__ = [
    "fbgemm_available",
    "fbgemm_unsupported_reason",
    "make_table_batched_embedding",
    "tbe_forward",
    "tbe_learning_rate",
    "tbe_optimizer_states",
    "tbe_set_learning_rate",
    "tbe_table_weights",
]


@functools.cache
def _training_module() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("fbgemm_gpu.split_table_batched_embeddings_ops_training")


def fbgemm_available() -> bool:
    """Whether ``fbgemm_gpu`` imports in this interpreter."""
    try:
        _training_module()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def fbgemm_unsupported_reason(
    *,
    dims: Sequence[int],
    pooling: PoolingType,
    data_type: DataType,
    optimizer: FusedOptimizerConfig | None,
    is_weighted: bool,
    device: torch.device,
) -> str | None:
    """Why FBGEMM's table-batched kernel cannot run this group of tables, or None when it can."""
    from shardrec.kernels.specs import DataType, OptimizerType, PoolingType

    if not fbgemm_available():
        return "fbgemm_gpu is not importable"
    if optimizer is None:
        return (
            "plain mode (.grad) is not offered by FBGEMM's host (CPU) kernel; use the torch backend"
        )
    bad = [d for d in dims if d % 4]
    if bad:
        return f"FBGEMM needs embedding_dim divisible by 4, got {bad}"
    if pooling is PoolingType.NONE and len(set(dims)) > 1:
        dims_seen = sorted(set(dims))
        return f"FBGEMM's sequence (NONE) lookup needs one embedding_dim per call, got {dims_seen}"
    if device.type == "cpu":
        if pooling is PoolingType.NONE:
            # Measured with fbgemm-gpu-cpu 1.8.0: out-of-bounds errors on valid ids as soon as a
            # bag holds several ids or features share a table.
            return "FBGEMM's CPU sequence (NONE) lookup fails on valid multi-id bags"
        if is_weighted and pooling is PoolingType.MEAN:
            # Measured with fbgemm-gpu-cpu 1.8.0: the forward divides by the bag length, the
            # backward does not, so weights would receive L times the true gradient.
            return "FBGEMM's CPU backward of weighted MEAN pooling omits the 1/length factor"
        if optimizer.optimizer is OptimizerType.ADAM:
            return "FBGEMM's CPU kernel has no fused Adam"
        if data_type is DataType.BF16:
            return "FBGEMM's CPU kernel has no BF16 weights"
    elif device.type != "cuda":
        return f"FBGEMM runs on cpu or cuda, not {device.type}"
    return None


def make_table_batched_embedding(
    *,
    shapes: Sequence[tuple[int, int]],
    feature_table_map: Sequence[int],
    pooling: PoolingType,
    data_type: DataType,
    optimizer: FusedOptimizerConfig,
    device: torch.device,
) -> nn.Module:
    """FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` over tables of ``(rows, dim)``.

    The optimizer is fused into backward. Ids are bounds-checked by the caller, so FBGEMM's own
    check is off.
    """
    from shardrec.kernels.specs import DataType, OptimizerType, PoolingType

    optimizers = {
        OptimizerType.SGD: "EXACT_SGD",
        OptimizerType.EXACT_ADAGRAD: "EXACT_ADAGRAD",
        OptimizerType.ROWWISE_ADAGRAD: "EXACT_ROWWISE_ADAGRAD",
        OptimizerType.ADAM: "ADAM",
    }
    pooling_modes = {PoolingType.SUM: "SUM", PoolingType.MEAN: "MEAN", PoolingType.NONE: "NONE"}
    precisions = {DataType.FP32: "FP32", DataType.FP16: "FP16", DataType.BF16: "BF16"}
    training = _training_module()
    common = importlib.import_module("fbgemm_gpu.split_table_batched_embeddings_ops_common")
    configs = importlib.import_module("fbgemm_gpu.split_embedding_configs")
    on_cuda = device.type == "cuda"
    location = common.EmbeddingLocation.DEVICE if on_cuda else common.EmbeddingLocation.HOST
    compute = training.ComputeDevice.CUDA if on_cuda else training.ComputeDevice.CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module: nn.Module = training.SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, dim, location, compute) for rows, dim in shapes],
            feature_table_map=list(feature_table_map),
            optimizer=getattr(configs.EmbOptimType, optimizers[optimizer.optimizer]),
            pooling_mode=getattr(common.PoolingMode, pooling_modes[pooling]),
            weights_precision=getattr(configs.SparseType, precisions[data_type]),
            output_dtype=configs.SparseType.FP32,
            learning_rate=optimizer.learning_rate,
            eps=optimizer.eps,
            beta1=optimizer.beta1,
            beta2=optimizer.beta2,
            stochastic_rounding=False,
            bounds_check_mode=common.BoundsCheckMode.NONE,
            device=device,
        )
    if not on_cuda:
        _move_host_storage_to_huge_pages(module)
    return module


def _move_host_storage_to_huge_pages(module: nn.Module) -> None:
    """Re-home FBGEMM's host weights and optimizer states on transparent huge pages.

    FBGEMM allocates them with plain ``torch.zeros``, i.e. 4 KiB pages where every random row costs
    a TLB miss; the forward and backward kernels read them through the module's attributes on every
    call, so swapping the storage under the same ``Parameter``/buffer is seen by every later call.
    """
    params = [n for n, p in module.named_parameters(recurse=False) if _host(n, p)]
    buffers = [
        n
        for n, b in module.named_buffers(recurse=False)
        if n.startswith("momentum") and _host(n, b)
    ]
    with torch.no_grad():
        for name in params:
            _rehome(name, module._parameters)
        for name in buffers:
            _rehome(name, module._buffers)


def _host(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith("_host") and tensor.numel() > 0


def _rehome(name: str, holder: dict[str, Any]) -> None:
    """Moves ``holder[name]`` onto huge pages. When it is all zeros (a fresh module), its storage
    is released before the new one is touched: the peak memory is one copy of the tables, not
    two."""
    from shardrec.kernels.memory import empty_rows

    old = holder[name]
    shape, dtype, device = tuple(old.shape), old.dtype, old.device
    is_param = isinstance(old, nn.Parameter)
    if not _all_zero(old):
        moved = empty_rows(shape, dtype, device)
        moved.copy_(old)
    else:
        if is_param:
            old.data = old.new_empty(0)
        else:
            holder[name] = old.new_empty(0)
        del old
        moved = empty_rows(shape, dtype, device).zero_()
    if is_param:
        holder[name].data = moved
    else:
        holder[name] = moved


def _all_zero(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """``not tensor.any()`` in slices: ``any()`` of a whole float tensor builds a bool copy of it
    (300 MB for the Criteo tables), which set the peak memory of building a model."""
    flat = tensor.detach().reshape(-1)
    return not any(bool(flat[i : i + chunk].any()) for i in range(0, flat.numel(), chunk))


def tbe_forward(
    module: nn.Module,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Pooled ``[B, sum of dims]`` (feature-major blocks), or ``[num_ids, dim]`` for NONE."""
    out: torch.Tensor = module(indices, offsets, per_sample_weights=per_sample_weights)
    return out


def tbe_table_weights(module: nn.Module) -> list[torch.Tensor]:
    """One ``[rows, dim]`` view per table into FBGEMM's fused weight storage."""
    views: list[torch.Tensor] = list(module.split_embedding_weights())  # type: ignore[operator]
    return [v.detach() for v in views]


def tbe_optimizer_states(
    module: nn.Module, optimizer: OptimizerType
) -> list[dict[str, torch.Tensor]]:
    """Per table, the optimizer state views named as :meth:`FusedOptimizerConfig.state_names`."""
    from shardrec.kernels.specs import OptimizerType

    if optimizer is OptimizerType.SGD:
        return [{} for _ in tbe_table_weights(module)]
    states: list[list[torch.Tensor]] = module.split_optimizer_states()  # type: ignore[operator]
    result: list[dict[str, torch.Tensor]] = []
    for per_table in states:
        if optimizer is OptimizerType.ADAM:
            # FBGEMM's checkpointing counter (its host copy starts from it in a fresh module).
            iteration: torch.Tensor = module.iter  # type: ignore[assignment]
            result.append(
                {"exp_avg": per_table[0], "exp_avg_sq": per_table[1], "step": iteration.view(())}
            )
        else:
            result.append({"sum": per_table[0]})
    return result


def tbe_set_learning_rate(module: nn.Module, lr: float) -> None:
    """Set the learning rate FBGEMM's fused optimizer uses from the next backward on."""
    module.set_learning_rate(float(lr))  # type: ignore[operator]


def tbe_learning_rate(module: nn.Module) -> float:
    """The learning rate FBGEMM's fused optimizer currently uses."""
    return float(module.get_learning_rate())  # type: ignore[operator]
