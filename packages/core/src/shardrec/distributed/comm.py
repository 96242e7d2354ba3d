"""Autograd-aware collectives on ``torch.distributed``, the same code on gloo (CPU) and NCCL (CUDA).

Most of it is built on ``all_to_all_single`` with explicit split sizes, which both backends have.
A reduce-scatter of equal row blocks uses the backend's own (gloo and NCCL both have one); uneven
blocks, and compressed ones (each partial sum rounded once), are an all-to-all followed by a local
sum: the bytes moved are the same as a reduce-scatter's, only the additions happen on the receiver.

With no process group (``pg=None``, a single process) every collective is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardrec.distributed.group_ref import GroupRef
from shardrec.distributed.qcomm import QCommsConfig, quantized_all_to_all

__all__ = [
    "JaggedAllToAllResult",
    "all_to_all_jagged",
    "all_to_all_single",
    "exchange_counts",
    "flagged_ranks",
    "gather_objects",
    "reduce_scatter_rows",
]


def _world(pg: dist.ProcessGroup | None) -> int:
    return 1 if pg is None else dist.get_world_size(pg)


def _raw_all_to_all(
    x: torch.Tensor,
    out_rows: Sequence[int],
    in_rows: Sequence[int],
    pg: dist.ProcessGroup | None,
) -> torch.Tensor:
    """All-to-all of row blocks of ``x`` (no autograd). ``in_rows[r]`` rows go to rank ``r``."""
    if sum(in_rows) != x.shape[0]:
        raise ValueError(f"all_to_all: input has {x.shape[0]} rows, splits say {sum(in_rows)}")
    if pg is None or len(in_rows) == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    dist.all_to_all_single(out, x, list(out_rows), list(in_rows), group=pg)
    return out


#: Who owns the group in an error, when a backward runs after destroy_process_group.
_GRADIENT = "the gradient of a collective"


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        out_rows: list[int],
        in_rows: list[int],
        pg: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.out_rows, ctx.in_rows = out_rows, in_rows
        # Weakly: an output kept after destroy_process_group must not keep the group alive.
        ctx.pg = None if pg is None else GroupRef.to(pg, _GRADIENT)
        return _raw_all_to_all(x, out_rows, in_rows, pg)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        # The gradient travels the reverse route: what we received goes back to its sender.
        pg = None if ctx.pg is None else ctx.pg()
        return _raw_all_to_all(grad, ctx.in_rows, ctx.out_rows, pg), None, None, None


def all_to_all_single(
    x: torch.Tensor,
    out_rows: Sequence[int],
    in_rows: Sequence[int],
    pg: dist.ProcessGroup | None,
    *,
    differentiable: bool = False,
    qcomms: QCommsConfig | None = None,
) -> torch.Tensor:
    """Send ``in_rows[r]`` leading-dimension rows of ``x`` to rank ``r``; receive
    ``out_rows[r]`` from it.

    ``qcomms``: send ``x`` and its gradient in these wire dtypes (see :mod:`.qcomm`); the result
    keeps ``x``'s dtype. None or fp32 both ways: ``x`` travels as it is.

    Differentiable: the gradient is sent back along the reverse route. A collective's backward
    must run on every rank, so ``differentiable=True`` puts it in the autograd graph (when grad
    mode is on) even on a rank whose ``x`` needs no gradient, e.g. one that holds no shard and
    sends nothing: otherwise its peers would wait for it in backward.
    """
    if pg is None:
        return x
    if differentiable and torch.is_grad_enabled() and not x.requires_grad:
        x = x.detach().requires_grad_()
    if qcomms is not None and not qcomms.is_fp32 and len(in_rows) > 1:
        return quantized_all_to_all(x, out_rows, in_rows, pg, qcomms)
    if x.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _AllToAll.apply(x, list(out_rows), list(in_rows), pg)  # type: ignore[no-untyped-call]
        return out
    return _raw_all_to_all(x, out_rows, in_rows, pg)


def exchange_counts(counts: torch.Tensor, pg: dist.ProcessGroup | None) -> torch.Tensor:
    """Each rank sends row ``r`` of ``counts`` (shape ``(world, k)``, int64) to rank ``r``.

    Returns ``(world, k)``: row ``s`` is what rank ``s`` sent us. This is the split exchange
    that comes
    before every jagged all-to-all; it is the one host synchronisation of an input distribution.
    """
    world = _world(pg)
    if counts.dim() != 2 or counts.shape[0] != world:
        raise ValueError(f"exchange_counts: expected shape ({world}, k), got {tuple(counts.shape)}")
    return _raw_all_to_all(counts, [1] * world, [1] * world, pg)


@dataclass(frozen=True, slots=True)
class JaggedAllToAllResult:
    """What a jagged all-to-all delivered, concatenated by sender rank.

    ``lengths_per_rank[s]`` and ``values_per_rank[s]`` count the lengths entries and ids that rank
    ``s`` sent us; ``batch_per_rank[s]`` is the batch size it declared.
    """

    lengths: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor | None
    lengths_per_rank: list[int]
    values_per_rank: list[int]
    batch_per_rank: list[int]
    #: Ranks that flagged their batch as bad (``reject=``); when any did, nothing was sent and
    #: the tensors are empty, on every rank alike.
    rejected_by: tuple[int, ...] = ()


def all_to_all_jagged(
    lengths: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    lengths_per_rank: Sequence[int],
    values_per_rank: Sequence[int],
    batch_size: int,
    pg: dist.ProcessGroup | None,
    reject: torch.Tensor | None = None,
) -> JaggedAllToAllResult:
    """Send the ``r``-th block of ``lengths``/``values``/``weights`` to rank ``r``.

    ``reject``: a 0-d tensor on ``values``' device, nonzero when this rank's batch failed its
    checks. It rides with the splits (no collective and no host read of its own); when any rank
    rejects, no id moves and every rank gets a result with ``rejected_by`` set, so that all of
    them can raise together instead of some waiting for the others.

    The blocks are consecutive: block ``r`` holds ``lengths_per_rank[r]`` lengths and
    ``values_per_rank[r]`` ids (and as many weights). Splits are exchanged first, then lengths
    and ids
    travel together in one int64 all-to-all, then the weights when present. The weights'
    all-to-all is differentiable on every rank when the weights of any rank require grad (a flag
    rides with the splits), so every rank enters its backward: a rank that does not use the
    weights it received must still give them a gradient (zeros), e.g. through an empty slice.
    """
    world = _world(pg)
    if len(lengths_per_rank) != world or len(values_per_rank) != world:
        raise ValueError(f"all_to_all_jagged: need {world} blocks, got {len(lengths_per_rank)}")
    if pg is None or world == 1:
        if reject is not None and bool(reject):
            return _rejected(lengths, values, weights, world, (0,))
        return JaggedAllToAllResult(
            lengths, values, weights, list(lengths_per_rank), list(values_per_rank), [batch_size]
        )
    weights_grad = weights is not None and weights.requires_grad and torch.is_grad_enabled()
    send_counts = torch.tensor(
        [
            [nl, nv, batch_size, int(weights_grad)]
            for nl, nv in zip(lengths_per_rank, values_per_rank, strict=True)
        ],
        dtype=torch.int64,
    )
    device = values.device
    send_counts = send_counts.to(device)
    if reject is not None:
        flag = reject.reshape(1, 1).to(device=device, dtype=torch.int64).expand(world, 1)
        send_counts = torch.cat([send_counts, flag], dim=1)
    else:
        send_counts = torch.cat([send_counts, send_counts.new_zeros(world, 1)], dim=1)
    # The one host read of the exchange: split sizes, and whether any rank rejected its batch.
    recv_counts = exchange_counts(send_counts, pg).cpu()
    rejected_by = tuple(int(r) for r in torch.nonzero(recv_counts[:, 4]).view(-1).tolist())
    if rejected_by:
        return _rejected(lengths, values, weights, world, rejected_by)
    recv_lengths = [int(x) for x in recv_counts[:, 0].tolist()]
    recv_values = [int(x) for x in recv_counts[:, 1].tolist()]
    recv_batch = [int(x) for x in recv_counts[:, 2].tolist()]
    any_weights_grad = bool(recv_counts[:, 3].any())

    # One message per destination: its lengths, then its ids.
    lengths64 = lengths.to(torch.int64)
    pieces: list[torch.Tensor] = []
    l_parts = torch.split(lengths64, list(lengths_per_rank))
    v_parts = torch.split(values.to(torch.int64), list(values_per_rank))
    for lp, vp in zip(l_parts, v_parts, strict=True):
        pieces.extend((lp, vp))
    packed = torch.cat(pieces) if pieces else lengths64
    send_rows = [nl + nv for nl, nv in zip(lengths_per_rank, values_per_rank, strict=True)]
    recv_rows = [nl + nv for nl, nv in zip(recv_lengths, recv_values, strict=True)]
    got = _raw_all_to_all(packed, recv_rows, send_rows, pg)
    split_sizes: list[int] = []
    for nl, nv in zip(recv_lengths, recv_values, strict=True):
        split_sizes.extend((nl, nv))
    got_parts = torch.split(got, split_sizes)
    out_lengths = torch.cat(got_parts[0::2]).to(lengths.dtype)
    out_values = torch.cat(got_parts[1::2]).to(values.dtype)
    out_weights = None
    if weights is not None:
        out_weights = all_to_all_single(
            weights, recv_values, list(values_per_rank), pg, differentiable=any_weights_grad
        )
    return JaggedAllToAllResult(
        out_lengths, out_values, out_weights, recv_lengths, recv_values, recv_batch
    )


def _rejected(
    lengths: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor | None,
    world: int,
    ranks: tuple[int, ...],
) -> JaggedAllToAllResult:
    return JaggedAllToAllResult(
        lengths[:0],
        values[:0],
        None if weights is None else weights[:0],
        [0] * world,
        [0] * world,
        [0] * world,
        rejected_by=ranks,
    )


def flagged_ranks(flag: torch.Tensor, pg: dist.ProcessGroup | None) -> list[int]:
    """The ranks whose ``flag`` (a 0-d tensor) is nonzero, known on every rank: one all-reduce of
    ``world`` int32 and one host read. For a module with no collective of its own to carry a flag
    (a data-parallel table's lookup)."""
    if pg is None:
        return [0] if bool(flag) else []
    world = dist.get_world_size(pg)
    votes = torch.zeros(world, dtype=torch.int32, device=flag.device)
    votes[dist.get_rank(pg)] = flag.to(torch.int32)
    dist.all_reduce(votes, group=pg)
    return [int(r) for r in torch.nonzero(votes.cpu()).view(-1).tolist()]


def gather_objects(obj: object, pg: dist.ProcessGroup | None) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank. Slow (pickles, two
    collectives): for error paths, such as putting every rank's description of a bad batch into
    the error each rank raises."""
    if pg is None:
        return [obj]
    out: list[object] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, obj, group=pg)
    return out


#: Backends with a native reduce-scatter and all-gather of flat tensors (gloo has both in the
#: torches we support); others use the all-to-all emulation.
_NATIVE_REDUCE_SCATTER = frozenset({"gloo", "nccl"})


def _reduce_scatter_fn() -> Any:
    # torch 2.13 renamed reduce_scatter_tensor (kept, deprecated); 2.11 has only the old name.
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_fn() -> Any:
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _raw_reduce_scatter(x: torch.Tensor, world: int, pg: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _reduce_scatter_fn()(out, x, group=pg)
    return out


class _ReduceScatter(torch.autograd.Function):
    """Native sum-reduce-scatter of equal row blocks; the gradient is all-gathered back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, world: int, pg: dist.ProcessGroup) -> torch.Tensor:
        ctx.world, ctx.pg = world, GroupRef.to(pg, _GRADIENT)
        return _raw_reduce_scatter(x, world, pg)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] * ctx.world, *grad.shape[1:]))
        _all_gather_fn()(out, grad, group=ctx.pg())
        return out, None, None


def reduce_scatter_rows(
    x: torch.Tensor,
    in_rows: Sequence[int],
    out_rows: int,
    pg: dist.ProcessGroup | None,
    *,
    qcomms: QCommsConfig | None = None,
) -> torch.Tensor:
    """Sum-reduce-scatter by rows: block ``r`` of ``x`` (``in_rows[r]`` rows) is added into rank
    ``r``.

    Every rank receives ``out_rows`` rows from each rank and returns their sum, shape
    ``(out_rows, *x.shape[1:])``; differentiable (the gradient is the received gradient sent back
    to every contributor). Equal blocks on a backend with a native reduce-scatter (gloo, NCCL) use
    it: one message of ``out_rows`` rows per peer each way, summed in the collective; otherwise an
    all-to-all and a local sum (also when the blocks are empty). Every rank must pass the same
    ``in_rows``.

    ``qcomms`` (not fp32): every block is sent rounded to the wire dtype by an all-to-all and the
    blocks are summed on the receiver in ``x``'s dtype, so each partial sum is rounded once (a
    reduce-scatter in the wire dtype would round the running sums again at every hop).
    """
    world = _world(pg)
    if pg is None or world == 1:
        return x
    quantized = qcomms is not None and not qcomms.is_fp32
    if (
        not quantized
        and out_rows > 0
        and all(n == out_rows for n in in_rows)
        and x.shape[0] == world * out_rows
        and dist.get_backend(pg) in _NATIVE_REDUCE_SCATTER
    ):
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()  # backward's all-gather must run on every rank
        if x.requires_grad and torch.is_grad_enabled():
            out: torch.Tensor = _ReduceScatter.apply(x, world, pg)  # type: ignore[no-untyped-call]
            return out
        return _raw_reduce_scatter(x, world, pg)
    got = all_to_all_single(x, [out_rows] * world, in_rows, pg, differentiable=True, qcomms=qcomms)
    return got.view(world, out_rows, *x.shape[1:]).sum(dim=0)
