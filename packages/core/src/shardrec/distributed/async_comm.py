"""Collectives issued with asynchronous work handles, for the input and the output distribution.

:func:`start_all_to_all_jagged` is :func:`shardrec.distributed.comm.all_to_all_jagged` cut at its
two waits: it issues the split exchange and returns; ``advance()`` waits for the splits (the one
host read), then issues the ids' all-to-all and returns; ``wait()`` waits for the ids. Between
the calls the caller's thread is free, so a training pipeline can compute one batch while the next
batch's ids travel. :func:`start_flagged_ranks` is :func:`comm.flagged_ranks` the same way.

The output distribution's collectives, :func:`start_all_to_all_single` and
:func:`start_reduce_scatter_rows`, are autograd-aware like :func:`comm.all_to_all_single` and
:func:`comm.reduce_scatter_rows`: the forward message is issued at once and ``wait()`` gives the
received tensor, in the autograd graph; the gradient goes back (blocking) in backward. A sharded
module that looks up several groups of tables can so compute the next group while the previous
one's rows travel.

Same messages, same order, same results as the blocking versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from shardrec.distributed import comm
from shardrec.distributed.awaitables import Mapped, Ready
from shardrec.distributed.group_ref import GroupRef
from shardrec.distributed.qcomm import QCommsConfig
from shardrec.distributed.types import Awaitable

__all__ = [
    "JaggedAllToAllAwaitable",
    "TensorAwaitable",
    "start_all_to_all_jagged",
    "start_all_to_all_single",
    "start_flagged_ranks",
    "start_reduce_scatter_rows",
]

#: Who owns the group in an error, when a backward runs after destroy_process_group.
_GRADIENT = "the gradient of a collective"


class JaggedAllToAllAwaitable:
    """A jagged all-to-all in flight; see :func:`start_all_to_all_jagged`."""

    def __init__(
        self,
        lengths: torch.Tensor,
        values: torch.Tensor,
        weights: torch.Tensor | None,
        *,
        lengths_per_rank: Sequence[int],
        values_per_rank: Sequence[int],
        batch_size: int,
        pg: dist.ProcessGroup,
        reject: torch.Tensor | None,
    ) -> None:
        world = dist.get_world_size(pg)
        if len(lengths_per_rank) != world or len(values_per_rank) != world:
            raise ValueError(f"all_to_all_jagged: need {world} blocks, got {len(lengths_per_rank)}")
        self._lengths, self._values, self._weights = lengths, values, weights
        self._lengths_per_rank = list(lengths_per_rank)
        self._values_per_rank = list(values_per_rank)
        self._pg, self._world = pg, world
        weights_grad = weights is not None and weights.requires_grad and torch.is_grad_enabled()
        device = values.device
        counts = torch.tensor(
            [
                [nl, nv, batch_size, int(weights_grad)]
                for nl, nv in zip(lengths_per_rank, values_per_rank, strict=True)
            ],
            dtype=torch.int64,
        ).to(device)
        flag = (
            counts.new_zeros(world, 1)
            if reject is None
            else reject.reshape(1, 1).to(device=device, dtype=torch.int64).expand(world, 1)
        )
        send_counts = torch.cat([counts, flag], dim=1).contiguous()
        self._recv_counts = torch.empty_like(send_counts)
        self._counts_work: dist.Work | None = dist.all_to_all_single(
            self._recv_counts, send_counts, [1] * world, [1] * world, group=pg, async_op=True
        )
        self._ids_work: dist.Work | None = None
        self._weights_work: dist.Work | None = None
        self._got: torch.Tensor | None = None
        self._got_weights: torch.Tensor | None = None
        self._result: comm.JaggedAllToAllResult | None = None
        self._advanced = False

    def advance(self) -> None:
        """Wait for the splits and issue the ids (and weights); a no-op when done already."""
        if self._advanced:
            return
        self._advanced = True
        assert self._counts_work is not None
        self._counts_work.wait()
        recv = self._recv_counts.cpu()
        rejected = tuple(int(r) for r in torch.nonzero(recv[:, 4]).view(-1).tolist())
        if rejected:
            self._result = comm.JaggedAllToAllResult(
                self._lengths[:0],
                self._values[:0],
                None if self._weights is None else self._weights[:0],
                [0] * self._world,
                [0] * self._world,
                [0] * self._world,
                rejected_by=rejected,
            )
            return
        self._recv_lengths = [int(x) for x in recv[:, 0].tolist()]
        self._recv_values = [int(x) for x in recv[:, 1].tolist()]
        self._recv_batch = [int(x) for x in recv[:, 2].tolist()]
        self._weights_grad = bool(recv[:, 3].any())
        lengths64 = self._lengths.to(torch.int64)
        pieces: list[torch.Tensor] = []
        l_parts = torch.split(lengths64, self._lengths_per_rank)
        v_parts = torch.split(self._values.to(torch.int64), self._values_per_rank)
        for lp, vp in zip(l_parts, v_parts, strict=True):
            pieces.extend((lp, vp))
        packed = (torch.cat(pieces) if pieces else lengths64).contiguous()
        send_rows = [
            a + b for a, b in zip(self._lengths_per_rank, self._values_per_rank, strict=True)
        ]
        recv_rows = [a + b for a, b in zip(self._recv_lengths, self._recv_values, strict=True)]
        self._got = packed.new_empty(sum(recv_rows))
        self._ids_work = dist.all_to_all_single(
            self._got, packed, recv_rows, send_rows, group=self._pg, async_op=True
        )
        if self._weights is not None and not self._weights_grad:
            weights = self._weights.detach().contiguous()
            self._got_weights = weights.new_empty(sum(self._recv_values))
            self._weights_work = dist.all_to_all_single(
                self._got_weights,
                weights,
                self._recv_values,
                self._values_per_rank,
                group=self._pg,
                async_op=True,
            )

    def wait(self) -> comm.JaggedAllToAllResult:
        self.advance()
        if self._result is not None:
            return self._result
        assert self._ids_work is not None
        assert self._got is not None
        self._ids_work.wait()
        split_sizes: list[int] = []
        for nl, nv in zip(self._recv_lengths, self._recv_values, strict=True):
            split_sizes.extend((nl, nv))
        parts = torch.split(self._got, split_sizes)
        out_lengths = torch.cat(parts[0::2]).to(self._lengths.dtype)
        out_values = torch.cat(parts[1::2]).to(self._values.dtype)
        out_weights: torch.Tensor | None = None
        if self._weights_work is not None:
            self._weights_work.wait()
            out_weights = self._got_weights
        elif self._weights is not None:
            # Weights that need a gradient travel through the autograd-aware all-to-all (its
            # backward sends the gradient home), blocking, as in the unpipelined path.
            out_weights = comm.all_to_all_single(
                self._weights,
                self._recv_values,
                self._values_per_rank,
                self._pg,
                differentiable=True,
            )
        self._result = comm.JaggedAllToAllResult(
            out_lengths,
            out_values,
            out_weights,
            self._recv_lengths,
            self._recv_values,
            self._recv_batch,
        )
        return self._result


def start_all_to_all_jagged(
    lengths: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    lengths_per_rank: Sequence[int],
    values_per_rank: Sequence[int],
    batch_size: int,
    pg: dist.ProcessGroup | None,
    reject: torch.Tensor | None = None,
) -> Awaitable[comm.JaggedAllToAllResult]:
    """Issue :func:`comm.all_to_all_jagged` (same arguments, same result) and return at once."""
    if pg is None or dist.get_world_size(pg) == 1:
        return Ready(
            comm.all_to_all_jagged(
                lengths,
                values,
                weights,
                lengths_per_rank=lengths_per_rank,
                values_per_rank=values_per_rank,
                batch_size=batch_size,
                pg=pg,
                reject=reject,
            )
        )
    return JaggedAllToAllAwaitable(
        lengths,
        values,
        weights,
        lengths_per_rank=lengths_per_rank,
        values_per_rank=values_per_rank,
        batch_size=batch_size,
        pg=pg,
        reject=reject,
    )


class _FlaggedRanks:
    def __init__(self, flag: torch.Tensor, pg: dist.ProcessGroup) -> None:
        world = dist.get_world_size(pg)
        self._votes = torch.zeros(world, dtype=torch.int32, device=flag.device)
        self._votes[dist.get_rank(pg)] = flag.to(torch.int32)
        self._work: dist.Work | None = dist.all_reduce(self._votes, group=pg, async_op=True)
        self._result: list[int] | None = None

    def advance(self) -> None:
        pass

    def wait(self) -> list[int]:
        if self._result is None:
            assert self._work is not None
            self._work.wait()
            self._result = [int(r) for r in torch.nonzero(self._votes.cpu()).view(-1).tolist()]
        return self._result


def start_flagged_ranks(flag: torch.Tensor, pg: dist.ProcessGroup | None) -> Awaitable[list[int]]:
    """Issue :func:`comm.flagged_ranks` and return at once."""
    if pg is None:
        return Ready(comm.flagged_ranks(flag, pg))
    return _FlaggedRanks(flag, pg)


class TensorAwaitable:
    """A tensor that a collective is still writing: ``wait()`` waits for the collective and
    returns it (cast to ``dtype``). The send buffer is kept alive until then."""

    def __init__(
        self, out: torch.Tensor, work: dist.Work, send: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self._out = out
        self._work: dist.Work | None = work
        self._send: torch.Tensor | None = send
        self._dtype = dtype

    def advance(self) -> None:
        pass

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            # Outside the graph: gloo finishes some collectives with a copy into the output,
            # which autograd would otherwise record as overwriting it (cutting the gradient).
            with torch.no_grad():
                self._work.wait()
            self._work, self._send = None, None
            if self._out.dtype != self._dtype:
                self._out = self._out.to(self._dtype)
        return self._out


class _Issued:
    """What a collective's autograd forward issued, handed to its :class:`TensorAwaitable`."""

    work: dist.Work | None = None
    send: torch.Tensor | None = None


def _issue_all_to_all(
    x: torch.Tensor,
    out_rows: list[int],
    in_rows: list[int],
    pg: dist.ProcessGroup,
    wire: torch.dtype,
    issued: _Issued,
) -> torch.Tensor:
    if sum(in_rows) != x.shape[0]:
        raise ValueError(f"all_to_all: input has {x.shape[0]} rows, splits say {sum(in_rows)}")
    send = x.detach().to(wire).contiguous()
    out = send.new_empty((sum(out_rows), *x.shape[1:]))
    issued.work = dist.all_to_all_single(out, send, out_rows, in_rows, group=pg, async_op=True)
    issued.send = send
    return out


class _StartAllToAll(torch.autograd.Function):
    """Forward: issue the all-to-all (the output is filled when the work completes). Backward: the
    gradient goes back along the reverse route in ``back_wire``, blocking."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        out_rows: list[int],
        in_rows: list[int],
        pg: dist.ProcessGroup,
        wire: torch.dtype,
        back_wire: torch.dtype,
        issued: _Issued,
    ) -> torch.Tensor:
        ctx.out_rows, ctx.in_rows, ctx.back_wire = out_rows, in_rows, back_wire
        ctx.pg = GroupRef.to(pg, _GRADIENT)  # weakly, as comm's collectives
        ctx.dtype = x.dtype
        return _issue_all_to_all(x, out_rows, in_rows, pg, wire, issued)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        send = grad.to(ctx.back_wire).contiguous()
        back = send.new_empty((sum(ctx.in_rows), *grad.shape[1:]))
        dist.all_to_all_single(back, send, ctx.in_rows, ctx.out_rows, group=ctx.pg())
        return back.to(ctx.dtype), None, None, None, None, None, None


def start_all_to_all_single(
    x: torch.Tensor,
    out_rows: Sequence[int],
    in_rows: Sequence[int],
    pg: dist.ProcessGroup | None,
    *,
    differentiable: bool = False,
    qcomms: QCommsConfig | None = None,
) -> Awaitable[torch.Tensor]:
    """Issue :func:`comm.all_to_all_single` (same arguments, same result) and return at once:
    ``[sum(in_rows), ...] -> [sum(out_rows), ...]``, the rows for rank ``r`` sent to it."""
    if pg is None or len(in_rows) == 1:
        return Ready(
            comm.all_to_all_single(
                x, out_rows, in_rows, pg, differentiable=differentiable, qcomms=qcomms
            )
        )
    if differentiable and torch.is_grad_enabled() and not x.requires_grad:
        # The backward exchange must run on every rank, also one whose rows need no gradient.
        x = x.detach().requires_grad_()
    quantized = qcomms is not None and not qcomms.is_fp32
    wire = qcomms.forward_precision.dtype if qcomms is not None and quantized else x.dtype
    back = qcomms.backward_precision.dtype if qcomms is not None and quantized else x.dtype
    issued = _Issued()
    if x.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _StartAllToAll.apply(  # type: ignore[no-untyped-call]
            x, list(out_rows), list(in_rows), pg, wire, back, issued
        )
    else:
        out = _issue_all_to_all(x, list(out_rows), list(in_rows), pg, wire, issued)
    assert issued.work is not None
    assert issued.send is not None
    return TensorAwaitable(out, issued.work, issued.send, x.dtype)


class _StartReduceScatter(torch.autograd.Function):
    """Forward: issue the native sum-reduce-scatter of equal row blocks. Backward: the gradient is
    all-gathered back, blocking."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, world: int, pg: dist.ProcessGroup, issued: _Issued
    ) -> torch.Tensor:
        ctx.world, ctx.pg = world, GroupRef.to(pg, _GRADIENT)
        return _issue_reduce_scatter(x, world, pg, issued)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] * ctx.world, *grad.shape[1:]))
        comm._all_gather_fn()(out, grad, group=ctx.pg())
        return out, None, None, None


def _issue_reduce_scatter(
    x: torch.Tensor, world: int, pg: dist.ProcessGroup, issued: _Issued
) -> torch.Tensor:
    send = x.detach().contiguous()
    out = send.new_empty((send.shape[0] // world, *send.shape[1:]))
    issued.work = comm._reduce_scatter_fn()(out, send, group=pg, async_op=True)
    issued.send = send
    return out


def start_reduce_scatter_rows(
    x: torch.Tensor,
    in_rows: Sequence[int],
    out_rows: int,
    pg: dist.ProcessGroup | None,
    *,
    qcomms: QCommsConfig | None = None,
) -> Awaitable[torch.Tensor]:
    """Issue :func:`comm.reduce_scatter_rows` (same arguments, same result, the same choice
    between the native reduce-scatter and an all-to-all plus a local sum) and return at once:
    ``[sum(in_rows), ...] -> [out_rows, ...]``, summed over the ranks."""
    world = 1 if pg is None else dist.get_world_size(pg)
    if pg is None or world == 1:
        return Ready(comm.reduce_scatter_rows(x, in_rows, out_rows, pg, qcomms=qcomms))
    quantized = qcomms is not None and not qcomms.is_fp32
    if (
        not quantized
        and out_rows > 0
        and all(n == out_rows for n in in_rows)
        and x.shape[0] == world * out_rows
        and dist.get_backend(pg) in comm._NATIVE_REDUCE_SCATTER
    ):
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()  # backward's all-gather must run on every rank
        issued = _Issued()
        if x.requires_grad and torch.is_grad_enabled():
            out: torch.Tensor = _StartReduceScatter.apply(x, world, pg, issued)  # type: ignore[no-untyped-call]
        else:
            out = _issue_reduce_scatter(x, world, pg, issued)
        assert issued.work is not None
        assert issued.send is not None
        return TensorAwaitable(out, issued.work, issued.send, x.dtype)
    pending = start_all_to_all_single(
        x, [out_rows] * world, in_rows, pg, differentiable=True, qcomms=qcomms
    )
    shape = x.shape[1:]
    return Mapped(pending, lambda got: got.view(world, out_rows, *shape).sum(dim=0))
