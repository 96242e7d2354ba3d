"""What a table-batched lookup is built from: tables, features, the fused optimizer, the backend."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import torch

__all__ = [
    "BACKEND_ENV_VAR",
    "DataType",
    "FeatureSpec",
    "FusedOptimizerConfig",
    "KernelBackend",
    "OptimizerType",
    "PoolingType",
    "StorageChoice",
    "TableSpec",
    "data_type_to_dtype",
    "parse_optimizer",
    "requested_backend",
]

BACKEND_ENV_VAR: Final = "SHARDREC_KERNEL_BACKEND"


class PoolingType(StrEnum):
    """How the rows of one bag are reduced: ``SUM``, ``MEAN``, or ``NONE`` (no pooling)."""

    SUM = "SUM"
    MEAN = "MEAN"
    NONE = "NONE"


class DataType(StrEnum):
    """Storage type of a table's weights (TorchRec's spelling)."""

    FP32 = "FP32"
    FP16 = "FP16"
    BF16 = "BF16"


_DTYPES: dict[DataType, torch.dtype] = {
    DataType.FP32: torch.float32,
    DataType.FP16: torch.float16,
    DataType.BF16: torch.bfloat16,
}


def data_type_to_dtype(data_type: DataType) -> torch.dtype:
    """The torch dtype that stores weights of ``data_type``."""
    return _DTYPES[DataType(data_type)]


class KernelBackend(StrEnum):
    """Which implementation runs the lookup.

    ``AUTO`` picks ``FBGEMM`` when it is importable and supports the configuration (dims multiple of
    4, a fused optimizer it has on this device), except on CPU for the fused optimizers whose torch
    update is measured faster there (exact Adagrad); else ``TORCH``. The rule is
    :func:`shardrec.kernels.storage_groups.resolve_default_backend`; both give the same results.
    """

    AUTO = "auto"
    TORCH = "torch"
    FBGEMM = "fbgemm"


def requested_backend(backend: KernelBackend | str | None) -> KernelBackend:
    """The backend asked for: the argument, else ``$SHARDREC_KERNEL_BACKEND``, else ``AUTO``."""
    raw = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    try:
        return KernelBackend(str(raw).lower())
    except ValueError:
        source = "backend argument" if backend is not None else f"${BACKEND_ENV_VAR}"
        allowed = ", ".join(b.value for b in KernelBackend)
        raise ValueError(f"{source} must be one of {allowed}, got {raw!r}") from None


class OptimizerType(StrEnum):
    """Optimizers fused into backward: they update only the rows a batch touched."""

    SGD = "sgd"
    EXACT_ADAGRAD = "exact_adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"


# Spellings accepted in TorchRec-style ``fused_params`` (FBGEMM's EmbOptimType values) and ours.
_OPTIMIZER_ALIASES: Final[Mapping[str, OptimizerType]] = {
    "sgd": OptimizerType.SGD,
    "exact_sgd": OptimizerType.SGD,
    "adagrad": OptimizerType.EXACT_ADAGRAD,
    "exact_adagrad": OptimizerType.EXACT_ADAGRAD,
    "rowwise_adagrad": OptimizerType.ROWWISE_ADAGRAD,
    "exact_row_wise_adagrad": OptimizerType.ROWWISE_ADAGRAD,
    "row_wise_adagrad": OptimizerType.ROWWISE_ADAGRAD,
    "exact_rowwise_adagrad": OptimizerType.ROWWISE_ADAGRAD,
    "adam": OptimizerType.ADAM,
}


def parse_optimizer(name: object) -> OptimizerType:
    """The optimizer a user's spelling names: an :class:`OptimizerType`, one of its values, an
    alias of TorchRec's ``fused_params`` or FBGEMM (``adagrad``, ``exact_sgd``,
    ``exact_row_wise_adagrad``...), in any case, or an enum whose ``.value`` is one of those
    (FBGEMM's ``EmbOptimType``).

    Every place that takes an optimizer by name (fused params, the planner, its constraints) parses
    it here once; past that boundary an optimizer is an ``OptimizerType``.
    """
    if isinstance(name, OptimizerType):
        return name
    raw = getattr(name, "value", name)
    found = _OPTIMIZER_ALIASES.get(raw.lower()) if isinstance(raw, str) else None
    if found is None:
        raise ValueError(
            f"unsupported fused optimizer {name!r}; shardrec's fused optimizers are"
            f" {', '.join(o.value for o in OptimizerType)} (also spelled"
            f" {', '.join(sorted(set(_OPTIMIZER_ALIASES) - {o.value for o in OptimizerType}))})"
        )
    return found


@dataclass(frozen=True, kw_only=True, slots=True)
class FusedOptimizerConfig:
    """An optimizer applied inside backward, on the touched rows only.

    Update rules (``g`` = the coalesced gradient of one row, ``t`` = the 1-based step number):

    - ``SGD``: ``w -= lr * g``
    - ``EXACT_ADAGRAD``: ``s += g²``; ``w -= lr * g / (sqrt(s) + eps)`` (``sum``, table-shaped)
    - ``ROWWISE_ADAGRAD``: ``s += mean(g²)``; ``w -= lr * g / (sqrt(s) + eps)`` (``sum``, per row)
    - ``ADAM``: ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g²``;
      ``w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`` (states ``exp_avg``, ``exp_avg_sq``)
    """

    optimizer: OptimizerType
    learning_rate: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", parse_optimizer(self.optimizer))
        for name in ("learning_rate", "eps", "beta1", "beta2"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"fused optimizer {name} must be a finite number >= 0, got {value}"
                )

    @classmethod
    def from_fused_params(cls, params: Mapping[str, object]) -> FusedOptimizerConfig:
        """Build from a TorchRec-style ``fused_params`` dict.

        Keys: ``optimizer``, ``learning_rate``, ``eps``, ``beta1``, ``beta2``; the optimizer may be
        a string or an enum whose ``.value`` is one (FBGEMM's ``EmbOptimType`` spellings work).
        """
        known = {"optimizer", "learning_rate", "eps", "beta1", "beta2"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unsupported fused_params keys {unknown}; supported: {sorted(known)}")
        if "optimizer" not in params:
            raise ValueError("fused_params needs an 'optimizer' entry")
        optimizer = parse_optimizer(params["optimizer"])
        floats: dict[str, float] = {}
        for key in ("learning_rate", "eps", "beta1", "beta2"):
            if key in params:
                value = params[key]
                if not isinstance(value, int | float):
                    raise TypeError(f"fused_params[{key!r}] must be a number, got {value!r}")
                floats[key] = float(value)
        return cls(optimizer=optimizer, **floats)

    def state_names(self) -> tuple[str, ...]:
        """Names of the per-table optimizer state tensors.

        Adam's ``step`` is a 0-d int64: the number of updates applied (its bias correction), shared
        by the tables stored together.
        """
        if self.optimizer in (OptimizerType.EXACT_ADAGRAD, OptimizerType.ROWWISE_ADAGRAD):
            return ("sum",)
        if self.optimizer is OptimizerType.ADAM:
            return ("exp_avg", "exp_avg_sq", "step")
        return ()


@dataclass(frozen=True, slots=True)
class StorageChoice:
    """A table's storage backend, by its registered name, and that backend's options.

    ``options`` are strings the backend reads (the mmap example's ``directory``); the backend
    refuses options it does not know, naming the table.
    """

    backend: str
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked at run time too: configs are written by hand, and a wrong type fails late.
        backend: object = self.backend
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"StorageChoice.backend must be a non-empty str, got {backend!r}")
        items: list[tuple[object, object]] = list(self.options.items())
        for key, value in items:
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"StorageChoice({self.backend!r}) options must map str to str, got"
                    f" {key!r}: {value!r}"
                )
        # A private copy: a caller's dict changed later does not change this choice.
        object.__setattr__(self, "options", dict(self.options))

    def __hash__(self) -> int:
        return hash((self.backend, tuple(sorted(self.options.items()))))


@dataclass(frozen=True, kw_only=True, slots=True)
class TableSpec:
    """One local table of a lookup.

    A row-wise shard is a table with fewer rows (the caller offsets the ids), a column-wise shard a
    table of smaller ``embedding_dim``. ``storage``: the storage backend that holds it (see
    :mod:`shardrec.kernels.storage`); None: the lookup's ``backend=``.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: PoolingType = PoolingType.SUM
    data_type: DataType = DataType.FP32
    storage: StorageChoice | None = None

    def __post_init__(self) -> None:
        for what in ("num_embeddings", "embedding_dim"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{what} of table {self.name!r} must be an int >= 1, got {value!r}"
                )
        object.__setattr__(self, "pooling", PoolingType(self.pooling))
        object.__setattr__(self, "data_type", DataType(self.data_type))
        if self.storage is not None and not isinstance(self.storage, StorageChoice):
            raise TypeError(
                f"storage of table {self.name!r} must be a StorageChoice or None,"
                f" got {self.storage!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class FeatureSpec:
    """A feature (a KJT key) and the table it reads."""

    name: str
    table: str
