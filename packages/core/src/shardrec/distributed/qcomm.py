"""Compressed communication: pooled embeddings (and their gradients) travel in fp16 or bf16.

A :class:`QCommsConfig` says which dtype the forward values and the backward gradients have on
the wire. The sender casts to that dtype just before the collective and the receiver casts back to
the tensor's own dtype (fp32) just after, so everything around the collective, the sums included,
stays in fp32::

    fp32 [rows, D] --cast--> wire dtype --all-to-all--> wire dtype --cast--> fp32 [rows', D]
    fp32 grad      <--cast-- wire dtype <--all-to-all-- wire dtype <--cast-- fp32 grad

Each element is rounded once per hop, so its relative error is at most the wire dtype's unit
roundoff (:meth:`CommType.unit_roundoff`: ``2**-11`` for fp16, ``2**-8`` for bf16), plus, for
fp16, an absolute ``2**-25`` below its normal range (and an overflow past 65504, where fp16 gives
inf: bf16 has fp32's range). A reduce-scatter under compression is an all-to-all of the rounded
partial sums and a sum in fp32 on the receiver (the same bytes per rank as a ring reduce-scatter):
a native reduce-scatter in the wire dtype would round each running sum again at every hop.

The precision is chosen per module: the plan's ``ParameterSharding`` of each table carries a
``qcomms`` config (None: fp32), and :func:`with_qcomms` sets it on a plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.distributed as dist

from shardrec.distributed.group_ref import GroupRef
from shardrec.distributed.types import ShardingPlan

__all__ = ["CommType", "QCommsConfig", "quantized_all_to_all", "with_qcomms"]


class CommType(StrEnum):
    """The dtype a tensor has on the wire."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self]

    @property
    def unit_roundoff(self) -> float:
        """The largest relative error of rounding an fp32 number (in range) to this dtype."""
        return _UNIT_ROUNDOFF[self]

    @property
    def bytes_per_element(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


_DTYPES = {
    CommType.FP32: torch.float32,
    CommType.FP16: torch.float16,
    CommType.BF16: torch.bfloat16,
}
_UNIT_ROUNDOFF = {CommType.FP32: 2.0**-24, CommType.FP16: 2.0**-11, CommType.BF16: 2.0**-8}


@dataclass(frozen=True, kw_only=True, slots=True)
class QCommsConfig:
    """The wire dtypes of a module's pooled-output collectives: ``forward_precision`` for the
    embeddings, ``backward_precision`` for their gradients (TorchRec's names)."""

    forward_precision: CommType = CommType.FP32
    backward_precision: CommType = CommType.FP32

    def __post_init__(self) -> None:
        for name in ("forward_precision", "backward_precision"):
            value = getattr(self, name)
            try:
                precision = CommType(value)
            except ValueError:
                choices = ", ".join(c.value for c in CommType)
                raise ValueError(
                    f"QCommsConfig.{name}: {value!r} is not one of {choices}"
                ) from None
            object.__setattr__(self, name, precision)

    @classmethod
    def both(cls, precision: CommType | str) -> QCommsConfig:
        """The same precision forward and backward."""
        p = CommType(precision)
        return cls(forward_precision=p, backward_precision=p)

    @property
    def is_fp32(self) -> bool:
        return self.forward_precision == CommType.FP32 and self.backward_precision == CommType.FP32


def _cast_all_to_all(
    x: torch.Tensor,
    out_rows: Sequence[int],
    in_rows: Sequence[int],
    pg: dist.ProcessGroup,
    wire: torch.dtype,
) -> torch.Tensor:
    if sum(in_rows) != x.shape[0]:
        raise ValueError(f"all_to_all: input has {x.shape[0]} rows, splits say {sum(in_rows)}")
    send = x.to(wire).contiguous()
    out = send.new_empty((sum(out_rows), *x.shape[1:]))
    dist.all_to_all_single(out, send, list(out_rows), list(in_rows), group=pg)
    return out.to(x.dtype)


class _QuantizedAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        out_rows: list[int],
        in_rows: list[int],
        pg: dist.ProcessGroup,
        config: QCommsConfig,
    ) -> torch.Tensor:
        ctx.out_rows, ctx.in_rows, ctx.config = out_rows, in_rows, config
        # Weakly: an output kept after destroy_process_group must not keep the group alive.
        ctx.pg = GroupRef.to(pg, "the gradient of a compressed all-to-all")
        return _cast_all_to_all(x, out_rows, in_rows, pg, config.forward_precision.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        wire = ctx.config.backward_precision.dtype
        back = _cast_all_to_all(grad, ctx.in_rows, ctx.out_rows, ctx.pg(), wire)
        return back, None, None, None, None


def quantized_all_to_all(
    x: torch.Tensor,
    out_rows: Sequence[int],
    in_rows: Sequence[int],
    pg: dist.ProcessGroup,
    config: QCommsConfig,
) -> torch.Tensor:
    """:func:`shardrec.distributed.comm.all_to_all_single` with ``x`` sent in the config's
    forward dtype and its gradient in the backward dtype; the result has ``x``'s dtype.

    In the autograd graph when ``x`` requires grad and grad mode is on."""
    if x.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _QuantizedAllToAll.apply(  # type: ignore[no-untyped-call]
            x, list(out_rows), list(in_rows), pg, config
        )
        return out
    return _cast_all_to_all(x, out_rows, in_rows, pg, config.forward_precision.dtype)


def with_qcomms(
    plan: ShardingPlan, config: QCommsConfig | None, modules: Iterable[str] | None = None
) -> ShardingPlan:
    """A copy of ``plan`` whose tables in
    ``modules`` (FQNs; None: every module) send their pooled outputs with ``config``.

    Data-parallel tables send no pooled outputs; their config is kept but never used."""
    chosen = set(plan.plan) if modules is None else set(modules)
    unknown = sorted(chosen - set(plan.plan))
    if unknown:
        raise ValueError(f"with_qcomms: modules {unknown} are not in the plan {sorted(plan.plan)}")
    return ShardingPlan(
        {
            fqn: {
                table: dataclasses.replace(ps, qcomms=config) if fqn in chosen else ps
                for table, ps in tables.items()
            }
            for fqn, tables in plan.plan.items()
        }
    )
