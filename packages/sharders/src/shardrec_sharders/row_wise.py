"""Row-wise sharding: each table is cut into contiguous blocks of rows, one block per rank.

    input dist   each id goes to the rank whose block holds its row, as an id local to that
                 block (bucketize, then one jagged all-to-all; splits exchanged first)
    lookup       the owner pools what it received, SUM-pooled partial bags, one fused call
    output dist  pooled:   partial sums go back to the senders and are added up: a reduce-scatter,
                           done as an all-to-all plus a local sum because gloo has no
                           reduce-scatter (the bytes moved are the same); MEAN divides afterwards
                 sequence: one row per id goes back and is put back in the id's place

Tables whose rows do not divide by the world size get blocks that differ by one row; a table with
fewer rows than ranks has blocks on some ranks only. Made of ``shardrec.distributed.sharding``'s
public blocks (``docs/plugins.md``), with ``bucketize_rows`` for the ids' owners and
``start_reduce_scatter_rows`` for the partial sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shardrec.distributed import comm
from shardrec.distributed.async_comm import (
    start_all_to_all_jagged,
    start_all_to_all_single,
    start_reduce_scatter_rows,
)
from shardrec.distributed.qcomm import QCommsConfig
from shardrec.distributed.sharding import (
    POOLED_TABLES_KEY,
    SEQUENCE_TABLES_KEY,
    Awaitable,
    BatchGuard,
    EmbeddingSharderBase,
    FeatureRouter,
    Mapped,
    ModuleView,
    ShardMetadata,
    StackedInput,
    append_key_strides,
    bucketize_rows,
    build_local_lookup,
    check_full_span,
    check_tiling,
    divide_mean_bags,
    even_row_shards,
    key_strides,
    local_tables_of,
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
from shardrec.modules import PoolingType
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor


@dataclass(frozen=True, slots=True)
class RowReceived:
    """The routed batch, the owner-sorted order of its ids and their owners, the ids received;
    ``strides``: the routed keys' own strides when their pooled rows come back at them."""

    routed: KeyedJaggedTensor
    order: torch.Tensor
    dest: torch.Tensor
    got: comm.JaggedAllToAllResult
    strides: list[int] | None = None


class RowShardedEmbedding(nn.Module):
    """A sharded EBC/EC part whose tables are split into row blocks across ranks."""

    def __init__(
        self,
        view: ModuleView,
        blocks: Mapping[str, Sequence[ShardMetadata]],
        env: ShardingEnv,
        device: torch.device,
        kind: str,
        *,
        qcomms: QCommsConfig | None = None,
    ) -> None:
        """``blocks[table]``: the table's full-width row blocks in row order; ``qcomms``: the
        wire dtypes of the output collectives (None: fp32)."""
        super().__init__()
        #: TableKeyPrefixed: where the unsharded module kept these tables.
        self.table_key_prefix = POOLED_TABLES_KEY if view.pooled else SEQUENCE_TABLES_KEY
        self.env = env
        self.qcomms = qcomms
        self.device = device
        self.pooled = view.pooled
        self.need_indices = view.need_indices
        self.pairs = view.pairs
        self.tables = list(view.configs)
        self.router = FeatureRouter([p.source for p in view.pairs], owner=f"{kind} (row_wise)")
        self.guard = BatchGuard.of(view, kind, env)
        world = env.world_size
        self.means = [view.pooling(p.table) is PoolingType.MEAN for p in view.pairs]
        # Per pair: the block boundaries, and the rank of each block.
        self._starts: list[torch.Tensor] = []
        self._ranks: list[torch.Tensor] = []
        for p in view.pairs:
            bl = blocks[p.table]
            self._starts.append(
                torch.tensor([b.offsets[0] for b in bl], dtype=torch.int64, device=device)
            )
            self._ranks.append(torch.tensor([b.rank for b in bl], dtype=torch.int64, device=device))
        # Pairs each rank receives: those whose table has a block there.
        self.pairs_of = [
            [i for i, p in enumerate(view.pairs) if any(b.rank == r for b in blocks[p.table])]
            for r in range(world)
        ]
        self.local_tables = [
            piece
            for table, bl in blocks.items()
            for piece in local_tables_of(
                table, bl, view.global_shape(table), env.rank, name_by_column=False
            )
        ]
        mine = self.pairs_of[env.rank]
        features = [(f"p{i}", view.pairs[i].table) for i in mine]
        self.lookup: TableBatchedEmbedding | None = build_local_lookup(
            view,
            self.local_tables,
            features,
            pooling_sum=True,
            device=device,
            optimizer=view.optimizer,
            check_inputs=False,  # the guard checks the user's batch before it moves
        )
        dims = [p.dim for p in view.pairs]
        starts = [0]
        for d in dims:
            starts.append(starts[-1] + d)
        self._total_dim = starts[-1]
        self._cols_of = [
            torch.tensor(
                [c for i in self.pairs_of[r] for c in range(starts[i], starts[i + 1])],
                dtype=torch.int64,
                device=device,
            )
            for r in range(world)
        ]
        self._width_of = [int(c.numel()) for c in self._cols_of]
        self._dims_of = [[dims[i] for i in self.pairs_of[r]] for r in range(world)]
        self._all_pairs = [p == list(range(len(view.pairs))) for p in self.pairs_of]

    # -- the three stages ----------------------------------------------------------------------

    def bucketize(self, routed: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per id: the destination rank and the id local to that rank's block."""
        values = routed.values()
        dest = torch.empty_like(values, dtype=torch.int64)
        local = torch.empty_like(values, dtype=torch.int64)
        at = 0
        for i, n in enumerate(routed.length_per_key()):
            dest[at : at + n], local[at : at + n] = bucketize_rows(
                values[at : at + n], self._starts[i], self._ranks[i]
            )
            at += n
        return dest, local

    def input_dist(self, kjt: KeyedJaggedTensor) -> Awaitable[RowReceived]:
        """Bucket the batch's ids by owner block; returns with the split exchange in flight."""
        # A variable batch's pooled rows come back at each key's own stride.
        strides = key_strides(self.router, kjt) if self.pooled else None
        routed = self.router.route(kjt)
        world = self.env.world_size
        batch = routed.stride()
        n_pairs = len(self.pairs)
        reject = self.guard.local_flag(routed)
        # Bucketing is safe on any integers (out-of-range ids land in the first or last block).
        dest, local = self.bucketize(routed)
        per_rank = torch.bincount(dest, minlength=world)
        # The split sizes are read on the host here anyway; the check's flag comes with them.
        host = torch.cat([per_rank, reject.view(1).to(per_rank.dtype)]).tolist()
        if host[-1]:
            rejected = self.guard.send_nothing(routed, local, reject)
            return Mapped(rejected, lambda got: self._received(routed, dest, dest, got))
        # Bag of every id, in the routed (pair-major) layout: pair * batch + sample.
        bag = torch.repeat_interleave(
            torch.arange(n_pairs * batch, device=dest.device), routed.lengths().to(torch.int64)
        )
        order = torch.argsort(dest, stable=True)
        counts = torch.bincount(dest * (n_pairs * batch) + bag, minlength=world * n_pairs * batch)
        counts = counts.view(world, n_pairs, batch)
        lengths = torch.cat(
            [
                counts[r].reshape(-1)
                if self._all_pairs[r]
                else counts[r, self.pairs_of[r]].reshape(-1)
                for r in range(world)
            ]
        )
        weights = routed.weights_or_none()
        lengths_per_rank = [len(self.pairs_of[r]) * batch for r in range(world)]
        if strides is not None:
            lengths, lengths_per_rank = append_key_strides(
                lengths, lengths_per_rank, strides, self.pairs_of
            )
        pending = start_all_to_all_jagged(
            lengths,
            local[order],
            None if weights is None else weights[order],
            lengths_per_rank=lengths_per_rank,
            values_per_rank=[int(x) for x in host[:-1]],
            batch_size=batch,
            pg=self.env.pg,
            reject=reject,
        )
        return Mapped(pending, lambda got: self._received(routed, order, dest, got, strides))

    def _received(
        self,
        routed: KeyedJaggedTensor,
        order: torch.Tensor,
        dest: torch.Tensor,
        got: comm.JaggedAllToAllResult,
        strides: list[int] | None = None,
    ) -> RowReceived:
        self.guard.received(routed, got)  # raises on every rank when any rank's batch was bad
        return RowReceived(routed, order, dest, got, strides)

    def compute(
        self, got: comm.JaggedAllToAllResult
    ) -> tuple[torch.Tensor | list[torch.Tensor] | None, StackedInput | None]:
        """One fused lookup of the ids every rank sent here, senders stacked along the batch:
        pooled, partial sums ``[W * B_max, our pairs' dims]``; sequence, one ``[ids, dim]`` per
        pair."""
        if self.lookup is None:
            return None, None
        stacked = stack_senders(got, len(self.pairs_of[self.env.rank]))
        if self.pooled:
            return lookup_pooled(self.lookup, stacked), stacked
        return lookup_sequence(self.lookup, stacked), stacked

    def output_dist_pooled(
        self,
        out: torch.Tensor | None,
        routed: KeyedJaggedTensor,
        stacked: StackedInput | None,
        received_weights: torch.Tensor | None = None,
        strides: list[int] | None = None,
    ) -> Awaitable[torch.Tensor]:
        """Partial sums back to their senders, in flight; ``wait()`` adds them up there (a
        reduce-scatter when every rank holds a block of every table, else an all-to-all and a sum
        per owner's columns) and gives ``[batch, sum of dims]``. A variable batch's rows travel
        at each key's own stride (``strides``: ours)."""
        world = self.env.world_size
        batch = routed.stride()
        if out is None or stacked is None:
            send, send_sizes = nothing_to_send(self.device, received_weights), [0] * world
        else:
            send, send_sizes = pooled_send_buffer(out, stacked, self._dims_of[self.env.rank])
        if all(self._all_pairs) and stacked is not None and stacked.strides is not None:
            # Every owner holds every pair, so every one got the same senders' strides: one
            # sender's rows have one layout and size on all of them, and they add up as flat.
            dims = self._dims_of[self.env.rank]
            mine = (
                batch * self._total_dim
                if strides is None
                else sum(n * d for n, d in zip(strides, dims, strict=True))
            )
            flat = start_reduce_scatter_rows(
                send.view(-1, 1), send_sizes, mine, self.env.pg, qcomms=self.qcomms
            )
            return Mapped(
                flat, lambda got: self._means(self._all_columns(got, strides, batch), routed)
            )
        if all(self._all_pairs) and stacked is not None:
            # Rows for rank s are its batch, ``stacked.batches[s]``, the same list on every rank;
            # the collective picks the native reduce-scatter when those batches are equal.
            summed = start_reduce_scatter_rows(
                send.view(-1, self._total_dim),
                stacked.batches,
                batch,
                self.env.pg,
                qcomms=self.qcomms,
            )
            return Mapped(summed, lambda values: self._means(values, routed))
        recv = [batch * self._width_of[r] for r in range(world)]
        if strides is None:
            pending = start_all_to_all_single(
                send, recv, send_sizes, self.env.pg, differentiable=True, qcomms=self.qcomms
            )
            return Mapped(
                pending, lambda flat: self._means(self._add_owners(flat, batch, recv), routed)
            )
        per_key = vbe_recv_sizes(strides, self.pairs_of, self._dims_of)
        pending = start_all_to_all_single(
            send, per_key, send_sizes, self.env.pg, differentiable=True, qcomms=self.qcomms
        )
        return Mapped(
            pending,
            lambda flat: self._means(
                self._add_owners(
                    pad_received(flat, strides, self.pairs_of, self._dims_of, batch), batch, recv
                ),
                routed,
            ),
        )

    def _all_columns(
        self, flat: torch.Tensor, strides: list[int] | None, batch: int
    ) -> torch.Tensor:
        """Summed rows of every pair, ours at their strides or plain, as ``[batch, dims]``."""
        if strides is not None:
            keys, dims = self.pairs_of[self.env.rank], self._dims_of[self.env.rank]
            flat = pad_received(flat.view(-1), strides, [keys], [dims], batch)
        return flat.view(batch, self._total_dim)

    def _add_owners(self, flat: torch.Tensor, batch: int, recv: list[int]) -> torch.Tensor:
        """Each owner's partial sums ``[batch, its pairs' dims]`` added into the module's
        columns: ``[batch, sum of dims]``."""
        values = flat.new_zeros((batch, self._total_dim))
        for r, part in enumerate(torch.split(flat, recv)):
            if self._width_of[r]:
                values = values.index_add(1, self._cols_of[r], part.view(batch, self._width_of[r]))
        return values

    def _means(self, values: torch.Tensor, routed: KeyedJaggedTensor) -> torch.Tensor:
        """MEAN pairs' sums divided by their bag sizes (the others as they are)."""
        if not any(self.means):
            return values
        lengths = routed.lengths().view(len(self.pairs), routed.stride())
        return divide_mean_bags(values, lengths, [p.dim for p in self.pairs], self.means)

    def output_dist_sequence(
        self,
        rows: list[torch.Tensor] | None,
        routed: KeyedJaggedTensor,
        order: torch.Tensor,
        dest: torch.Tensor,
        stacked: StackedInput | None,
    ) -> Awaitable[dict[str, JaggedTensor]]:
        """Each id's row back to its sender, in flight; ``wait()`` puts the rows back in the ids'
        places and gives the JaggedTensors."""
        world = self.env.world_size
        if rows is None or stacked is None:
            send, send_sizes = torch.zeros(0, device=self.device), [0] * world
        else:
            send, send_sizes = sequence_send_buffer(rows, stacked)
        # Owner r sends back rows for our ids pair by pair (pairs_of[r]), in the order we sent them.
        n_pairs = len(self.pairs)
        device = routed.values().device
        pair_of_id = torch.repeat_interleave(
            torch.arange(n_pairs, device=device),
            torch.tensor(routed.length_per_key(), device=device),
        )
        counts = torch.bincount(dest * n_pairs + pair_of_id, minlength=world * n_pairs)
        counts = counts.view(world, n_pairs).cpu()
        sorted_pairs = pair_of_id[order]
        recv = [
            sum(int(counts[r, p]) * self.pairs[p].dim for p in self.pairs_of[r])
            for r in range(world)
        ]
        pending = start_all_to_all_single(
            send, recv, send_sizes, self.env.pg, differentiable=True, qcomms=self.qcomms
        )
        return Mapped(
            pending,
            lambda flat: self._unsort_rows(flat, routed, order, counts, sorted_pairs, recv),
        )

    def _unsort_rows(
        self,
        flat: torch.Tensor,
        routed: KeyedJaggedTensor,
        order: torch.Tensor,
        counts: torch.Tensor,
        sorted_pairs: torch.Tensor,
        recv: list[int],
    ) -> dict[str, JaggedTensor]:
        # Rows arrive in sorted-id order (owner-major, then pair, then position): undo the sort,
        # pair by pair (pairs may differ in dim).
        per_pair_rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(self.pairs))}
        for r, block in enumerate(torch.split(flat, recv)):
            sizes = [int(counts[r, p]) * self.pairs[p].dim for p in self.pairs_of[r]]
            for p, piece in zip(self.pairs_of[r], torch.split(block, sizes), strict=True):
                per_pair_rows[p].append(piece.view(-1, self.pairs[p].dim))
        lpk = routed.length_per_key()
        result: dict[str, JaggedTensor] = {}
        at = 0
        for p, pair in enumerate(self.pairs):
            n_ids = lpk[p]
            mask = sorted_pairs == p
            # Positions (within this pair) of the ids in sorted order.
            pos = order[mask] - at
            got_rows = (
                torch.cat(per_pair_rows[p]) if per_pair_rows[p] else flat.new_zeros((0, pair.dim))
            )
            values = got_rows.new_zeros((n_ids, pair.dim)).index_copy(0, pos, got_rows)
            result[pair.name] = sequence_output(values, routed, p, self.need_indices)
            at += n_ids
        return result

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        return self.compute_and_output_dist(self.input_dist(kjt).wait())

    def compute_and_output_dist(self, ctx: RowReceived) -> KeyedTensor | dict[str, JaggedTensor]:
        return self.compute_and_start_output_dist(ctx).wait()

    def compute_and_start_output_dist(
        self, ctx: RowReceived
    ) -> Awaitable[KeyedTensor | dict[str, JaggedTensor]]:
        """The lookup, then the output distribution started (``wait()`` finishes it)."""
        routed, order, dest, got = ctx.routed, ctx.order, ctx.dest, ctx.got
        out, stacked = self.compute(got)
        if self.pooled:
            assert out is None or isinstance(out, torch.Tensor)
            values = self.output_dist_pooled(out, routed, stacked, got.weights, ctx.strides)
            return Mapped(values, lambda v: pooled_output(self.pairs, v, routed))
        assert out is None or isinstance(out, list)
        return self.output_dist_sequence(out, routed, order, dest, stacked)

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


class RowWiseSharder(EmbeddingSharderBase):
    """Shards EmbeddingBagCollection / EmbeddingCollection tables into row blocks."""

    sharding_type = ShardingType.ROW_WISE.value

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        self.check_plan(params, env)
        view = ModuleView.of(module, list(params))
        blocks: dict[str, list[ShardMetadata]] = {}
        for table, ps in params.items():
            rows, dim = view.global_shape(table)
            if not ps.shards:
                blocks[table] = even_row_shards(rows, dim, ps.ranks)
                continue
            nonempty = [s for s in ps.shards if s.sizes[0]]
            blocks[table] = check_tiling(
                table, "row-wise", "row blocks", nonempty, axis=0, total=rows
            )
            check_full_span(table, "row-wise", ps.shards, axis=1, total=dim)
        return RowShardedEmbedding(
            view, blocks, env, device, type(module).__name__, qcomms=self.qcomms_of(params)
        )
