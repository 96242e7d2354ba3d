"""Input-distribution collectives issued with asynchronous work handles.

:func:`start_all_to_all_jagged` is :func:`shardrec.distributed.comm.all_to_all_jagged` cut at its
two waits: it issues the split exchange and returns; ``advance()`` waits for the splits (the one
host read), then issues the ids' all-to-all and returns; ``wait()`` waits for the ids. Between
the calls the caller's thread is free, so a training pipeline can compute one batch while the next
batch's ids travel. :func:`start_flagged_ranks` is :func:`comm.flagged_ranks` the same way.
Same messages, same order, same results as the blocking versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from shardrec.distributed import comm
from shardrec.distributed.awaitables import Ready
from shardrec.distributed.types import Awaitable

__all__ = ["JaggedAllToAllAwaitable", "start_all_to_all_jagged", "start_flagged_ranks"]


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
