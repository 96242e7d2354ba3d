"""Stage 1, input distribution: check a batch before its ids move, send each id to the rank that
owns its row, and lay out what every rank sent for one fused lookup.

::

    rank s: routed KJT (F keys, B_s samples)
        --bucketize_rows--> per id: owner rank, id local to the owner's block
        --start_all_to_all_jagged (shardrec.distributed.async_comm)-->
    owner: JaggedAllToAllResult, sender-major (rank 0's F' keys x B_0, rank 1's ...)
        --stack_senders--> StackedInput, key-major: F' keys x (W x B_max) bags

A :class:`BatchGuard` folds "this rank's batch is bad" into the split exchange of that all-to-all
(or one tiny all-reduce), so a bad batch on any rank raises on every rank and none waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from shardrec.distributed import comm
from shardrec.distributed.async_comm import start_all_to_all_jagged
from shardrec.distributed.sharding.module_view import ModuleView, TableFeature
from shardrec.distributed.sharding.variable_batch import take_key_strides
from shardrec.distributed.types import Awaitable, ShardingEnv
from shardrec.kernels import BadBatchError, BatchChecker
from shardrec.sparse import KeyedJaggedTensor

__all__ = ["BatchGuard", "Received", "StackedInput", "bucketize_rows", "stack_senders"]


@dataclass(frozen=True, slots=True)
class Received:
    """What an input distribution leaves for the lookup: this rank's routed batch (its own
    samples, in the order the sharded module reads them) and the ids every rank sent here;
    ``strides``: each routed key's own number of samples when the batch was variable per key
    and its pooled rows come back at those strides (``variable_batch.key_strides``)."""

    routed: KeyedJaggedTensor
    got: comm.JaggedAllToAllResult
    strides: list[int] | None = None


def bucketize_rows(
    ids: torch.Tensor, starts: torch.Tensor, owners: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The owner of each id of one table cut into row blocks, and the id local to that block.

    ``starts``: the first row of each block, ascending; ``owners``: each block's rank. ``ids``
    ``[n]`` -> ``(dest [n], local [n])``, int64. Safe on any integers: an id outside the table
    lands in the first or last block (the guard has refused such a batch before it moves).
    """
    ids = ids.to(torch.int64)
    block = (torch.bucketize(ids, starts, right=True) - 1).clamp_(min=0)
    return owners[block], ids - starts[block]


class BatchGuard:
    """Checks this rank's batch before it is distributed, and makes a bad batch on any rank
    raise on every rank.

    ``local_flag`` reduces the routed batch to a 0-d tensor with no host read; the sharded module
    folds it into a collective every rank runs anyway (the split exchange of its input
    all-to-all) or, when it has none, into :func:`comm.flagged_ranks`. When a rank flagged,
    ``raise_for`` gathers each flagging rank's description (feature, table, the user's id, sample)
    and every rank raises the same :class:`BadBatchError`: no rank returns output, none waits.
    ``sources``/``tables``/``rows`` describe the routed KJT's keys, in order. ``pooled``: whether
    the module pools (an EmbeddingBagCollection) or returns each id's row.
    """

    def __init__(
        self,
        kind: str,
        sources: Sequence[str],
        tables: Sequence[str],
        rows: Sequence[int],
        *,
        enabled: bool,
        env: ShardingEnv,
        pooled: bool = True,
    ) -> None:
        self.kind = kind
        self.checker = BatchChecker(kind, sources, tables, rows)
        self.enabled = enabled
        self.env = env
        self.pooled = pooled

    @staticmethod
    def of(
        view: ModuleView,
        kind: str,
        env: ShardingEnv,
        pairs: Sequence[TableFeature] | None = None,
    ) -> BatchGuard:
        """The guard of a routed KJT whose keys are ``pairs`` (default: all of ``view.pairs``),
        enabled as the unsharded module's ``check_inputs``."""
        keys = view.pairs if pairs is None else pairs
        return BatchGuard(
            kind,
            [p.source for p in keys],
            [p.table for p in keys],
            [view.configs[p.table].num_embeddings for p in keys],
            enabled=view.check_inputs,
            env=env,
            pooled=view.pooled,
        )

    def local_flag(self, routed: KeyedJaggedTensor) -> torch.Tensor:
        """Nonzero when this rank's batch is bad: the dtype always, the contents when enabled."""
        values = routed.values()
        if self.checker.dtype_problem(values) is not None:
            return torch.ones((), dtype=torch.bool, device=values.device)
        if not self.enabled:
            return torch.zeros((), dtype=torch.bool, device=values.device)
        return self.checker.problem_flag(values, routed.lengths(), routed.length_per_key())

    def check_alone(self, routed: KeyedJaggedTensor) -> None:
        """Checks disabled, no collective to carry a flag: the free dtype check, on this rank."""
        problem = self.checker.dtype_problem(routed.values())
        if problem is not None:
            raise BadBatchError(f"rank {self.env.rank}: {problem}", ranks=(self.env.rank,))

    def send_nothing(
        self, routed: KeyedJaggedTensor, ids: torch.Tensor, reject: torch.Tensor
    ) -> Awaitable[comm.JaggedAllToAllResult]:
        """Enter the split exchange of a batch that failed its checks here with no ids at all:
        every rank learns of it there (bucketing negative lengths would go wrong). ``ids``: any
        tensor of the dtype the module sends its ids in."""
        world = self.env.world_size
        return start_all_to_all_jagged(
            routed.lengths()[:0],
            ids[:0],
            None,
            lengths_per_rank=[0] * world,
            values_per_rank=[0] * world,
            batch_size=routed.stride(),
            pg=self.env.pg,
            reject=reject,
        )

    def received(
        self,
        routed: KeyedJaggedTensor,
        got: comm.JaggedAllToAllResult,
        strides: list[int] | None = None,
    ) -> Received:
        """The context of a finished input distribution; raises on every rank if any rejected."""
        if got.rejected_by:
            self.raise_for(routed, got.rejected_by)
        return Received(routed, got, strides)

    def raise_for(self, routed: KeyedJaggedTensor, ranks: Sequence[int]) -> NoReturn:
        """Raise on every rank (all of them call this with the same ``ranks``)."""
        mine: str | None = None
        if self.env.rank in ranks:
            mine = self.checker.find_problem(
                routed.values(), routed.lengths(), routed.length_per_key(), routed.stride()
            )
            mine = mine or f"{self.kind}: the batch failed its checks"
        problems = comm.gather_objects(mine, self.env.pg)
        lines = [f"rank {r}: {p}" for r, p in enumerate(problems) if p is not None]
        raise BadBatchError(
            f"{self.kind}: the batch of rank(s) {list(ranks)} failed its checks (every rank"
            " raises this error; no rank returned output):\n  " + "\n  ".join(lines),
            ranks=ranks,
        )


@dataclass(frozen=True, slots=True)
class StackedInput:
    """What every rank sent us, as one key-major batch: sender blocks stacked along the batch.

    ::

        key 0: [ rank 0's B_max bags | rank 1's B_max bags | ... ]   (W x B_max bags per key)
        key 1: [ rank 0's B_max bags | rank 1's B_max bags | ... ]

    Sample ``s * batch + b`` is sample ``b`` of rank ``s`` (bags past rank ``s``'s batch are
    empty), so the pooled output's rows for rank ``s`` are one contiguous block: when every rank
    has the same batch, the output *is* the send buffer of the output all-to-all.
    ``seg_len[s][f]`` counts the ids rank ``s`` sent for key ``f``; ``strides[s][f]``, when some
    sender sent its keys' strides, how many of its bags of key ``f`` are its own (the rest pad
    its keys to its batch), for an output at each key's stride (``pooled_send_buffer``);
    ``strides[s]`` is None for a sender that did not.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    length_per_feature: list[int]
    batch: int  # per sender (the largest batch)
    batches: list[int]
    seg_len: list[list[int]]
    strides: list[list[int] | None] | None = None

    @property
    def bags_per_key(self) -> int:
        """``W x B_max``: the batch size of the stacked lookup."""
        return len(self.batches) * self.batch


def stack_senders(got: comm.JaggedAllToAllResult, n_features: int) -> StackedInput:
    """Reorder a jagged all-to-all's result (sender-major: each sender's ``n_features`` keys x its
    batch) into key-major, senders stacked along the batch (see :class:`StackedInput`). A
    sender's lengths may end with its keys' strides (``variable_batch.append_key_strides``)."""
    got, strides = take_key_strides(got, n_features)
    lengths, values, weights = got.lengths, got.values, got.weights
    batches = list(got.batch_per_rank)
    world = len(batches)
    b_max = max(batches) if batches else 0
    pieces = [
        p.view(n_features, b)
        for p, b in zip(torch.split(lengths, list(got.lengths_per_rank)), batches, strict=True)
    ]
    if all(b == b_max for b in batches):
        grid = torch.stack(pieces, dim=1) if world > 1 else pieces[0].unsqueeze(1)
    else:
        grid = lengths.new_zeros((n_features, world, b_max))
        for s, p in enumerate(pieces):
            grid[:, s, : batches[s]] = p
    seg = torch.stack([p.sum(dim=1) for p in pieces]).to(torch.int64)  # [world, n_features]
    seg_len = seg.tolist()
    flat_lengths = grid.reshape(-1).to(torch.int64)
    offsets = torch.zeros(flat_lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(flat_lengths, 0, out=offsets[1:])
    if world > 1 and n_features > 1 and values.numel():
        # Segment (s, f) moves from sender-major to key-major order.
        starts = torch.cumsum(seg.reshape(-1), 0) - seg.reshape(-1)
        seg_t = seg.t().reshape(-1)
        start_t = starts.view(world, n_features).t().reshape(-1)
        total = values.numel()
        shift = start_t - (torch.cumsum(seg_t, 0) - seg_t)
        index = torch.repeat_interleave(shift, seg_t, output_size=total) + torch.arange(
            total, device=values.device
        )
        values = values[index]
        if weights is not None:
            weights = weights[index]
    return StackedInput(
        values=values,
        offsets=offsets,
        weights=weights,
        length_per_feature=[sum(seg_len[s][f] for s in range(world)) for f in range(n_features)],
        batch=b_max,
        batches=batches,
        seg_len=seg_len,
        strides=strides,
    )
