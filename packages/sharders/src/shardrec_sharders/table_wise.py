"""Table-wise sharding: each table lives whole on one rank.

The three stages, for a batch of ``B_s`` samples on each rank ``s``::

    input dist   every rank sends the ids of each table's features to the table's owner
                 (one jagged all-to-all; splits exchanged first)
    lookup       the owner looks up what every rank sent in one fused call: features become
                 (sender, feature) pairs, bags padded to the largest batch
    output dist  pooled:   owner sends rows [B_s, dims of its tables] back to rank s (all-to-all),
                           which puts the columns back in the module's output order
                 sequence: owner sends one row per id back; rank s splits them per feature

Column-wise sharding (``column_wise.py``) is the same machine with each table cut into column
slices: a slice is a "table" of its own, and the receiver concatenates slices side by side.

Each stage is one method made of ``shardrec.distributed.sharding``'s public blocks
(``docs/plugins.md``): ``input_dist`` (``FeatureRouter``, ``BatchGuard``,
``start_all_to_all_jagged``), ``compute`` (``stack_senders``, ``lookup_pooled`` /
``lookup_sequence``) and ``compute_and_start_output_dist`` (``pooled_send_buffer`` /
``sequence_send_buffer``, ``start_all_to_all_single``, left in flight until ``wait()``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardrec.distributed import comm
from shardrec.distributed.async_comm import start_all_to_all_jagged, start_all_to_all_single
from shardrec.distributed.qcomm import QCommsConfig
from shardrec.distributed.sharding import (
    POOLED_TABLES_KEY,
    SEQUENCE_TABLES_KEY,
    Awaitable,
    BatchGuard,
    EmbeddingSharderBase,
    FeatureRouter,
    LocalTable,
    Mapped,
    ModuleView,
    Received,
    ShardMetadata,
    ShardRect,
    StackedInput,
    append_key_strides,
    build_local_lookup,
    key_strides,
    lookup_pooled,
    lookup_sequence,
    nothing_to_send,
    pad_received,
    pooled_output,
    pooled_send_buffer,
    sequence_output,
    sequence_send_buffer,
    stack_senders,
    table_shards,
    vbe_recv_sizes,
)
from shardrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType, TableShards
from shardrec.kernels import TableBatchedEmbedding
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor


@dataclass(frozen=True, slots=True)
class Unit:
    """One (pair, column slice) computed by ``rank``."""

    pair: int
    local: LocalTable
    rank: int


def _chunks(
    flat: torch.Tensor, batch: int, recv_sizes: list[int], widths: list[list[int]]
) -> dict[tuple[int, int], torch.Tensor]:
    """Views of owner ``r``'s ``i``-th column chunk in the received buffer."""
    chunks: dict[tuple[int, int], torch.Tensor] = {}
    for r, block in enumerate(torch.split(flat, recv_sizes)):
        if widths[r]:
            cols = block.view(batch, sum(widths[r]))
            for i, chunk in enumerate(torch.split(cols, widths[r], dim=1)):
                chunks[(r, i)] = chunk
    return chunks


class _OwnerBlocksToColumns(torch.autograd.Function):
    """Received owner-major blocks -> ``[batch, columns]`` in the module's order: one copy each way.

    (Autograd of split + cat would copy the gradient twice: once per owner block, once whole.)
    """

    @staticmethod
    def forward(
        ctx: Any,
        flat: torch.Tensor,
        batch: int,
        recv_sizes: list[int],
        widths: list[list[int]],
        order: list[tuple[int, int]],
    ) -> torch.Tensor:
        ctx.meta = (flat.numel(), batch, recv_sizes, widths, order)
        chunks = _chunks(flat, batch, recv_sizes, widths)
        ordered = [chunks[key] for key in order]
        if not ordered:
            return flat.new_zeros((batch, 0))
        return torch.cat(ordered, dim=1)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        numel, batch, recv_sizes, widths, order = ctx.meta
        out = grad.new_empty(numel)
        chunks = _chunks(out, batch, recv_sizes, widths)
        col = 0
        for key in order:
            width = chunks[key].shape[1]
            chunks[key].copy_(grad[:, col : col + width])
            col += width
        return out, None, None, None, None


class _SingleOwnerColumns(torch.autograd.Function):
    """One owner already sends the columns in the module's order: the received buffer is the
    output (a view, no copy); backward hands the gradient back flat (one copy only if strided)."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, batch: int) -> torch.Tensor:
        return flat.view(batch, -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous().view(-1), None


def _single_owner(widths: list[list[int]], order: list[tuple[int, int]]) -> bool:
    """True when one rank owns every column chunk and sends them in the module's order."""
    owners = [r for r, w in enumerate(widths) if w]
    return len(owners) == 1 and order == [(owners[0], i) for i in range(len(widths[owners[0]]))]


class ColumnSlicedEmbedding(nn.Module):
    """A sharded EBC/EC part whose tables are placed whole or in column slices on owner ranks."""

    def __init__(
        self,
        view: ModuleView,
        slices: Mapping[str, Sequence[ShardMetadata]],
        env: ShardingEnv,
        device: torch.device,
        kind: str,
        *,
        qcomms: QCommsConfig | None = None,
    ) -> None:
        """``slices[table]``: the table's column slices (each spanning every row) in column order;
        ``qcomms``: the wire dtypes of the output all-to-all (None: fp32)."""
        super().__init__()
        #: TableKeyPrefixed: where the unsharded module kept these tables.
        self.table_key_prefix = POOLED_TABLES_KEY if view.pooled else SEQUENCE_TABLES_KEY
        self.env = env
        self.qcomms = qcomms
        self.device = device
        self.pooled = view.pooled
        self.need_indices = view.need_indices
        self.kind = kind
        self.pairs = view.pairs
        self.tables = list(view.configs)
        world = env.world_size
        units: list[Unit] = []
        local_by_key: dict[tuple[str, int], LocalTable] = {}
        for p, pair in enumerate(view.pairs):
            shape = view.global_shape(pair.table)
            for s in slices[pair.table]:
                rect = s.rect
                key = (pair.table, rect.col_offset)
                if key not in local_by_key:
                    name = f"{pair.table}__c{rect.col_offset}"
                    local_by_key[key] = LocalTable(name, pair.table, rect, shape)
                units.append(Unit(p, local_by_key[key], s.rank))
        self.units_by_rank = [[u for u in units if u.rank == r] for r in range(world)]
        self.mine = self.units_by_rank[env.rank]
        routed_pairs = [view.pairs[u.pair] for r in range(world) for u in self.units_by_rank[r]]
        owner = f"{kind} ({ShardingType.TABLE_WISE}/{ShardingType.COLUMN_WISE})"
        self.router = FeatureRouter([p.source for p in routed_pairs], owner=owner)
        self.guard = BatchGuard.of(view, kind, env, routed_pairs)
        self.local_tables: list[LocalTable] = []
        for u in self.mine:
            if u.local not in self.local_tables:
                self.local_tables.append(u.local)
        features = [(f"u{i}", u.local.name) for i, u in enumerate(self.mine)]
        self.lookup: TableBatchedEmbedding | None = build_local_lookup(
            view,
            self.local_tables,
            features,
            pooling_sum=False,
            device=device,
            optimizer=view.optimizer,
            check_inputs=False,  # the guard checks the user's batch before it moves
        )
        # Received column chunks come owner by owner; this order puts them in pair order, each
        # pair's slices side by side.
        order = [
            (u.pair, u.local.rect.col_offset, r, i)
            for r in range(world)
            for i, u in enumerate(self.units_by_rank[r])
        ]
        self._chunk_order = [(r, i) for _, _, r, i in sorted(order)]
        self._widths = [[u.local.rect.cols for u in us] for us in self.units_by_rank]
        self._unit_cols = [sum(w) for w in self._widths]
        # The routed keys each owner gets (a variable batch's strides travel with them).
        firsts = [0]
        for us in self.units_by_rank:
            firsts.append(firsts[-1] + len(us))
        self._keys_of = [list(range(a, b)) for a, b in itertools.pairwise(firsts)]
        # E.g. every table on one rank (a one-process run): no reordering copy either way.
        self._identity_columns = _single_owner(self._widths, self._chunk_order)

    # -- the three stages ----------------------------------------------------------------------

    def input_dist(self, kjt: KeyedJaggedTensor) -> Awaitable[Received]:
        """Route the batch's ids to their owners; returns with the split exchange in flight."""
        # A variable batch's pooled rows come back at each key's own stride.
        strides = key_strides(self.router, kjt) if self.pooled else None
        routed = self.router.route(kjt)
        batch = routed.stride()
        lpk = routed.length_per_key()
        n_units = [len(us) for us in self.units_by_rank]
        values_per_rank, k = [], 0
        for n in n_units:
            values_per_rank.append(sum(lpk[k : k + n]))
            k += n
        lengths, lengths_per_rank = routed.lengths(), [n * batch for n in n_units]
        if strides is not None:
            lengths, lengths_per_rank = append_key_strides(
                lengths, lengths_per_rank, strides, self._keys_of
            )
        # The batch's check rides with the split exchange: no collective, no host read of its own.
        pending = start_all_to_all_jagged(
            lengths,
            routed.values(),
            routed.weights_or_none(),
            lengths_per_rank=lengths_per_rank,
            values_per_rank=values_per_rank,
            batch_size=batch,
            pg=self.env.pg,
            reject=self.guard.local_flag(routed),
        )
        return Mapped(pending, lambda got: self.guard.received(routed, got, strides))

    def compute(
        self, got: comm.JaggedAllToAllResult
    ) -> tuple[torch.Tensor | list[torch.Tensor] | None, StackedInput | None]:
        """One fused lookup of every rank's ids, senders stacked along the batch: pooled,
        ``[W * B_max, our columns]``; sequence, one ``[ids, cols]`` per unit."""
        if self.lookup is None:
            return None, None
        stacked = stack_senders(got, len(self.mine))
        if self.pooled:
            return lookup_pooled(self.lookup, stacked), stacked
        return lookup_sequence(self.lookup, stacked), stacked

    def output_dist_pooled(
        self,
        out: torch.Tensor | None,
        stacked: StackedInput | None,
        batch: int,
        received_weights: torch.Tensor | None = None,
        strides: list[int] | None = None,
    ) -> Awaitable[torch.Tensor]:
        """Rows back to their senders, in flight; ``wait()`` gives ``[batch, columns]`` with the
        columns put back in the module's order (one copy). ``strides``: our routed keys' own
        strides, when their rows come back at them (``Received.strides``)."""
        world = self.env.world_size
        if out is None or stacked is None:
            send, send_sizes = nothing_to_send(self.device, received_weights), [0] * world
        else:
            send, send_sizes = pooled_send_buffer(out, stacked, self._widths[self.env.rank])
        recv_sizes = [batch * self._unit_cols[r] for r in range(world)]
        if strides is None:
            pending = start_all_to_all_single(
                send, recv_sizes, send_sizes, self.env.pg, differentiable=True, qcomms=self.qcomms
            )
            return Mapped(pending, lambda flat: self._to_columns(flat, batch, recv_sizes))
        per_key = vbe_recv_sizes(strides, self._keys_of, self._widths)
        pending = start_all_to_all_single(
            send, per_key, send_sizes, self.env.pg, differentiable=True, qcomms=self.qcomms
        )
        return Mapped(
            pending,
            lambda flat: self._to_columns(
                pad_received(flat, strides, self._keys_of, self._widths, batch), batch, recv_sizes
            ),
        )

    def _to_columns(self, flat: torch.Tensor, batch: int, recv_sizes: list[int]) -> torch.Tensor:
        """The received owner blocks as ``[batch, columns]`` in the module's order."""
        out_t: torch.Tensor
        if self._identity_columns and batch:
            out_t = _SingleOwnerColumns.apply(flat, batch)  # type: ignore[no-untyped-call]
        else:
            out_t = _OwnerBlocksToColumns.apply(  # type: ignore[no-untyped-call]
                flat, batch, recv_sizes, self._widths, self._chunk_order
            )
        return out_t

    def output_dist_sequence(
        self,
        rows: list[torch.Tensor] | None,
        routed: KeyedJaggedTensor,
        stacked: StackedInput | None,
    ) -> Awaitable[dict[str, JaggedTensor]]:
        """Each id's row back to its sender, in flight; ``wait()`` gives the JaggedTensors."""
        world = self.env.world_size
        if rows is None or stacked is None:
            send, send_sizes = torch.zeros(0, device=self.device), [0] * world
        else:
            send, send_sizes = sequence_send_buffer(rows, stacked)
        lpk = routed.length_per_key()
        recv_sizes: list[int] = []
        k = 0
        for r in range(world):
            recv_sizes.append(
                sum(lpk[k + i] * u.local.rect.cols for i, u in enumerate(self.units_by_rank[r]))
            )
            k += len(self.units_by_rank[r])
        pending = start_all_to_all_single(
            send, recv_sizes, send_sizes, self.env.pg, differentiable=True, qcomms=self.qcomms
        )
        return Mapped(pending, lambda flat: self._sequence_rows(flat, routed, recv_sizes))

    def _sequence_rows(
        self, flat: torch.Tensor, routed: KeyedJaggedTensor, recv_sizes: list[int]
    ) -> dict[str, JaggedTensor]:
        """The received rows, owner by owner, as one JaggedTensor per pair (slices side by
        side)."""
        world = self.env.world_size
        lpk = routed.length_per_key()
        per_pair: dict[int, list[tuple[int, torch.Tensor]]] = {}
        k = 0
        for r, block in enumerate(torch.split(flat, recv_sizes)):
            us = self.units_by_rank[r]
            sizes = [lpk[k + i] * u.local.rect.cols for i, u in enumerate(us)]
            for i, (u, piece) in enumerate(zip(us, torch.split(block, sizes), strict=True)):
                per_pair.setdefault(u.pair, []).append(
                    (u.local.rect.col_offset, piece.view(lpk[k + i], u.local.rect.cols))
                )
            k += len(us)
        # Lengths of each pair, from the routed KJT (any of the pair's units has them).
        first_unit: dict[int, int] = {}
        k = 0
        for r in range(world):
            for i, u in enumerate(self.units_by_rank[r]):
                first_unit.setdefault(u.pair, k + i)
            k += len(self.units_by_rank[r])
        result: dict[str, JaggedTensor] = {}
        for p, pair in enumerate(self.pairs):
            parts = [t for _, t in sorted(per_pair[p], key=lambda x: x[0])]
            values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            at = first_unit[p]
            result[pair.name] = sequence_output(values, routed, at, self.need_indices)
        return result

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        return self.compute_and_output_dist(self.input_dist(kjt).wait())

    def compute_and_output_dist(self, ctx: Received) -> KeyedTensor | dict[str, JaggedTensor]:
        return self.compute_and_start_output_dist(ctx).wait()

    def compute_and_start_output_dist(
        self, ctx: Received
    ) -> Awaitable[KeyedTensor | dict[str, JaggedTensor]]:
        """The lookup, then the output distribution started (``wait()`` finishes it)."""
        routed, got = ctx.routed, ctx.got
        out, stacked = self.compute(got)
        if self.pooled:
            assert out is None or isinstance(out, torch.Tensor)
            values = self.output_dist_pooled(
                out, stacked, routed.stride(), got.weights, ctx.strides
            )
            return Mapped(values, lambda v: pooled_output(self.pairs, v, routed))
        assert out is None or isinstance(out, list)
        return self.output_dist_sequence(out, routed, stacked)

    @property
    def check_inputs(self) -> bool:
        """Whether each batch is checked before it is distributed (from the unsharded module)."""
        return self.guard.enabled

    @check_inputs.setter
    def check_inputs(self, enabled: bool) -> None:
        # Set it alike on every rank: the ranks must run the same collectives.
        self.guard.enabled = enabled

    def local_table_shards(self) -> dict[str, TableShards]:
        return table_shards(self.lookup, self.local_tables, self.tables)


class TableWiseSharder(EmbeddingSharderBase):
    """Shards EmbeddingBagCollection / EmbeddingCollection tables whole onto single ranks."""

    sharding_type = ShardingType.TABLE_WISE.value

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        self.check_plan(params, env)
        view = ModuleView.of(module, list(params))
        slices: dict[str, list[ShardMetadata]] = {}
        for table, ps in params.items():
            if len(ps.ranks) != 1:
                raise ValueError(
                    f"table-wise table {table!r} needs exactly one rank, got {ps.ranks}"
                )
            whole = ShardRect.whole(*view.global_shape(table))
            slices[table] = [ShardMetadata.placed(whole, ps.ranks[0])]
        return ColumnSlicedEmbedding(
            view, slices, env, device, type(module).__name__, qcomms=self.qcomms_of(params)
        )
