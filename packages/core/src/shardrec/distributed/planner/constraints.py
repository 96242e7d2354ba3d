"""What a user pins down about one table before the planner chooses for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardrec.kernels.specs import OptimizerType, parse_optimizer


@dataclass(frozen=True, slots=True, kw_only=True)
class ParameterConstraints:
    """Per-table limits and workload facts, keyed by table name in the planner's ``constraints``.

    - ``sharding_types`` / ``compute_kernels``: the only ones the planner may choose (None: any the
      sharders offer).
    - ``pooling_factor``: mean ids per sample per feature of this table (1.0: one-hot).
    - ``batch_size``: samples per rank per step, overriding the planner's ``batch_size`` for this
      table.
    - ``min_partition``: narrowest column shard for column-wise sharding (columns).
    - ``optimizer``: the fused optimizer whose state the table carries (overrides the module's and
      the planner's); a name is parsed by :func:`shardrec.kernels.parse_optimizer`.
    """

    sharding_types: Sequence[str] | None = None
    compute_kernels: Sequence[str] | None = None
    pooling_factor: float = 1.0
    batch_size: int | None = None
    min_partition: int | None = None
    optimizer: OptimizerType | None = None

    def __post_init__(self) -> None:
        if self.optimizer is not None:
            object.__setattr__(self, "optimizer", parse_optimizer(self.optimizer))
        if self.pooling_factor <= 0:
            raise ValueError(
                f"ParameterConstraints.pooling_factor must be > 0, got {self.pooling_factor}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"ParameterConstraints.batch_size must be >= 1, got {self.batch_size}")
        if self.min_partition is not None and self.min_partition < 1:
            raise ValueError(
                f"ParameterConstraints.min_partition must be >= 1, got {self.min_partition}"
            )
        for name in ("sharding_types", "compute_kernels"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(
                    f"ParameterConstraints.{name} must be a list of names, not the string {value!r}"
                )
            if value is not None and len(value) == 0:
                raise ValueError(
                    f"ParameterConstraints.{name} is empty: no choice would be allowed"
                )
