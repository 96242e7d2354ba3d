"""Table-wise-row-wise sharding: each table lives on one node, its rows split across that node's
ranks.

With ``L`` ranks per node (``LOCAL_WORLD_SIZE``), ``N`` nodes and ``W = N * L`` ranks, for a batch
of ``B_s`` samples on each rank ``s``::

    input dist   each id goes to the rank of its table's node whose row block holds it, as an id
                 local to that block (bucketize, then one jagged all-to-all over all W ranks)
    lookup       the owner SUM-pools what it received: partial bags [W senders x B_max, node cols]
    output dist  1. reduce-scatter inside the node: local rank l ends up with the full sums of its
                    node's tables for the samples of ranks (m, l), m = 0..N-1
                 2. all-to-all across nodes between ranks of the same local rank: each sends those
                    rows to their sample's rank; the receiver lays the nodes' columns side by side
                    and puts them in the module's order (MEAN divides by the bag length after)

So the cross-node links carry each pooled embedding once, where row-wise sends every rank's
partial sums across them. Grid sharding (``grid.py``) is the same machine with each table cut
into column slices first, one node per slice: a slice plays the part of a table here.
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
from shardrec.distributed.node_groups import NodeGroups, NodeLayout, node_groups
from shardrec.distributed.qcomm import QCommsConfig
from shardrec.distributed.sharding import (
    POOLED_TABLES_KEY,
    Awaitable,
    BatchGuard,
    EmbeddingSharderBase,
    FeatureRouter,
    LocalTable,
    Mapped,
    ModuleView,
    Ready,
    Received,
    Rect,
    ShardMetadata,
    Then,
    append_key_strides,
    bucketize_rows,
    build_local_lookup,
    check_full_span,
    check_tiling,
    divide_mean_bags,
    even_row_shards,
    key_strides,
    lookup_pooled,
    nothing_to_send,
    pack_rects,
    pad_received,
    pooled_output,
    stack_senders,
    table_shards,
    take_key_strides,
    vbe_recv_sizes,
)
from shardrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType, TableShards
from shardrec.kernels import TableBatchedEmbedding
from shardrec.modules import EmbeddingBagCollection, PoolingType
from shardrec.sparse import KeyedJaggedTensor, KeyedTensor


@dataclass(frozen=True, slots=True)
class NodeSlice:
    """Columns ``[col_offset, col_offset + cols)`` of a table, kept on one node and split there
    into row blocks, at most one per rank."""

    col_offset: int
    cols: int
    node: int
    blocks: tuple[ShardMetadata, ...]  # row order, each ``cols`` wide from ``col_offset``


@dataclass(frozen=True, slots=True)
class _Unit:
    """One (pair, column slice): the ids of the pair go to the slice's row blocks."""

    pair: int
    table: str
    slice: NodeSlice


class NodeRowShardedEmbedding(nn.Module):
    """A sharded EmbeddingBagCollection part whose tables (or column slices of them) each live on
    one node, split by rows across its ranks."""

    def __init__(
        self,
        view: ModuleView,
        slices: Mapping[str, Sequence[NodeSlice]],
        groups: NodeGroups,
        env: ShardingEnv,
        device: torch.device,
        kind: str,
        *,
        qcomms: QCommsConfig | None = None,
    ) -> None:
        """``slices[table]``: the table's column slices in column order; ``qcomms``: the wire
        dtypes of both output collectives (None: fp32)."""
        super().__init__()
        #: TableKeyPrefixed: where the unsharded module kept these tables.
        self.table_key_prefix = POOLED_TABLES_KEY
        self.qcomms = qcomms
        if not view.pooled:
            raise TypeError(f"{kind}: two-level sharding is for pooled (bag) modules only")
        self.env = env
        self.groups = groups
        self.device = device
        self.pairs = view.pairs
        self.tables = list(view.configs)
        self.router = FeatureRouter([p.source for p in view.pairs], owner=kind)
        self.guard = BatchGuard.of(view, kind, env)
        layout = groups.layout
        world = env.world_size
        self.units = [
            _Unit(p, pair.table, s) for p, pair in enumerate(view.pairs) for s in slices[pair.table]
        ]
        self.units_of = [
            [i for i, u in enumerate(self.units) if any(b.rank == r for b in u.slice.blocks)]
            for r in range(world)
        ]
        self._starts = [
            torch.tensor([b.offsets[0] for b in u.slice.blocks], dtype=torch.int64, device=device)
            for u in self.units
        ]
        self._owners = [
            torch.tensor([b.rank for b in u.slice.blocks], dtype=torch.int64, device=device)
            for u in self.units
        ]
        # This rank's blocks, one local table per (table, column slice).
        local: dict[tuple[str, int], LocalTable] = {}
        for table, table_slices in slices.items():
            shape = view.global_shape(table)
            for s in table_slices:
                for b in s.blocks:
                    if b.rank == env.rank:
                        name = f"{table}__c{s.col_offset}"
                        local[(table, s.col_offset)] = LocalTable(name, table, b.rect, shape)
        self.local_tables = list(local.values())
        mine = self.units_of[env.rank]
        features = [
            (f"u{i}", local[(self.units[i].table, self.units[i].slice.col_offset)].name)
            for i in mine
        ]
        self.lookup: TableBatchedEmbedding | None = build_local_lookup(
            view,
            self.local_tables,
            features,
            pooling_sum=True,
            device=device,
            optimizer=view.optimizer,
            check_inputs=False,  # the guard checks the user's batch before it moves
        )
        # Columns per node: the units of the node's slices, in unit order.
        node_units = [
            [i for i, u in enumerate(self.units) if u.slice.node == n] for n in range(layout.nodes)
        ]
        self._node_width = [sum(self.units[i].slice.cols for i in us) for us in node_units]
        # A variable batch: the routed keys (pairs) of each node's units and their columns; each
        # rank of a node gets the strides of all of them (it adds up and forwards their sums).
        self._node_keys = [[self.units[i].pair for i in us] for us in node_units]
        self._node_cols = [[self.units[i].slice.cols for i in us] for us in node_units]
        self._stride_keys_of = [self._node_keys[layout.node_of(r)] for r in range(world)]
        col_in_node: dict[int, int] = {}
        for us in node_units:
            at = 0
            for i in us:
                col_in_node[i] = at
                at += self.units[i].slice.cols
        # Our lookup's columns inside our node's partial sums (None: they are the same).
        ours = node_units[groups.node]
        self._widen: torch.Tensor | None = None
        if mine != ours:
            self._widen = torch.tensor(
                [col_in_node[i] + c for i in mine for c in range(self.units[i].slice.cols)],
                dtype=torch.int64,
                device=device,
            )
        # Received node blocks side by side -> the module's column order.
        node_start = [0]
        for w in self._node_width:
            node_start.append(node_start[-1] + w)
        order = [
            node_start[u.slice.node] + col_in_node[i] + c
            for i, u in enumerate(self.units)
            for c in range(u.slice.cols)
        ]
        self._to_module: torch.Tensor | None = None
        if order != list(range(len(order))):
            self._to_module = torch.tensor(order, dtype=torch.int64, device=device)
        self.means = [view.pooling(p.table) is PoolingType.MEAN for p in view.pairs]

    # -- the three stages ----------------------------------------------------------------------

    def input_dist(self, kjt: KeyedJaggedTensor) -> Awaitable[Received]:
        """Bucket the batch's ids by owner block; returns with the split exchange in flight."""
        # A variable batch's pooled rows come back at each key's own stride.
        strides = key_strides(self.router, kjt)
        routed = self.router.route(kjt)
        world = self.env.world_size
        batch = routed.stride()
        reject = self.guard.local_flag(routed)
        n_units = len(self.units)
        values = routed.values()
        lpk = routed.length_per_key()
        first = [0]
        for n in lpk:
            first.append(first[-1] + n)
        # Bucketing is safe on any integers (out-of-range ids land in the first or last block).
        dests, locals_, sources = [], [], []
        for i, u in enumerate(self.units):
            lo, hi = first[u.pair], first[u.pair + 1]
            dest_i, local_i = bucketize_rows(values[lo:hi], self._starts[i], self._owners[i])
            dests.append(dest_i)
            locals_.append(local_i)
            sources.append(torch.arange(lo, hi, device=values.device))
        dest = torch.cat(dests) if dests else values.new_zeros(0, dtype=torch.int64)
        local = torch.cat(locals_) if locals_ else dest
        per_rank = torch.bincount(dest, minlength=world)
        # The split sizes are read on the host here anyway; the check's flag comes with them.
        host = torch.cat([per_rank, reject.view(1).to(per_rank.dtype)]).tolist()
        if host[-1]:
            rejected = self.guard.send_nothing(routed, local, reject)
            return Mapped(rejected, lambda got: self.guard.received(routed, got))
        # Sample of every id, in the routed (pair-major) layout.
        sample = torch.repeat_interleave(
            torch.arange(batch, device=values.device).repeat(len(self.pairs)),
            routed.lengths().to(torch.int64),
        )
        bags = [
            sample[first[u.pair] : first[u.pair + 1]] + i * batch for i, u in enumerate(self.units)
        ]
        bag = torch.cat(bags) if bags else dest
        order = torch.argsort(dest, stable=True)
        counts = torch.bincount(dest * (n_units * batch) + bag, minlength=world * n_units * batch)
        counts = counts.view(world, n_units, batch)
        lengths = torch.cat([counts[r, self.units_of[r]].reshape(-1) for r in range(world)])
        weights = routed.weights_or_none()
        if weights is not None:
            weights = weights[torch.cat(sources)[order]] if sources else weights[:0]
        lengths_per_rank = [len(self.units_of[r]) * batch for r in range(world)]
        if strides is not None:
            lengths, lengths_per_rank = append_key_strides(
                lengths, lengths_per_rank, strides, self._stride_keys_of
            )
        pending = start_all_to_all_jagged(
            lengths,
            local[order],
            weights,
            lengths_per_rank=lengths_per_rank,
            values_per_rank=[int(x) for x in host[:-1]],
            batch_size=batch,
            pg=self.env.pg,
            reject=reject,
        )
        return Mapped(pending, lambda got: self.guard.received(routed, got, strides))

    def compute(self, got: comm.JaggedAllToAllResult) -> torch.Tensor | None:
        """Partial SUMs of every sender's bags over our blocks: ``[W * B_max, our columns]``."""
        if self.lookup is None:
            return None
        return lookup_pooled(self.lookup, stack_senders(got, len(self.units_of[self.env.rank])))

    def output_dist(
        self, out: torch.Tensor | None, got: comm.JaggedAllToAllResult, batch: int
    ) -> Awaitable[torch.Tensor]:
        """Reduce-scatter the partial sums inside the node, then all-to-all the full sums across
        nodes (issued when ``advance()`` or ``wait()`` finds the first done); ``wait()`` gives
        ``[batch, sum of dims]`` in the module's column order."""
        layout = self.groups.layout
        nodes, local_size = layout.nodes, layout.local_world_size
        batches = list(got.batch_per_rank)
        b_max = max(batches)
        width = self._node_width[self.groups.node]
        link = nothing_to_send(self.device, got.weights)  # empty; carries the weights' gradient
        if width == 0:
            # Issued at wait() like the others' (after their reduce-scatter): every rank creates
            # its collectives in one order, so backward runs them in one order too.
            return Then(Ready(link), lambda send: self._across_nodes(send, batches, batch))
        rows = nodes * local_size * b_max
        partial = self._node_partial(out, link, rows, width)
        # Sender (m, l)'s rows to local rank l: blocks ordered by local rank, then node.
        grouped = partial.reshape(nodes, local_size, b_max, width).transpose(0, 1)
        summed = start_reduce_scatter_rows(
            grouped.reshape(rows, width),
            [nodes * b_max] * local_size,
            nodes * b_max,
            self.groups.intra,
            qcomms=self.qcomms,
        )
        return Then(
            summed, lambda full: self._across_nodes(self._ours(full, batches), batches, batch)
        )

    def _node_partial(
        self, out: torch.Tensor | None, link: torch.Tensor, rows: int, width: int
    ) -> torch.Tensor:
        """This rank's partial sums at the node's width: zeros (tied to ``link`` so backward still
        reaches the input) when it looked nothing up, widened to the node's columns where it owns
        fewer."""
        if out is None:
            return link.sum() + torch.zeros((rows, width), device=self.device)
        if self._widen is not None:
            return out.new_zeros((rows, width)).index_copy(1, self._widen, out)
        return out

    def _ours(self, summed: torch.Tensor, batches: list[int]) -> torch.Tensor:
        """The full sums this local rank sends across nodes, flat: node m's ranks' batches."""
        nodes, local_size = self.groups.layout.nodes, self.groups.layout.local_world_size
        b_max = max(batches)
        mine = [batches[m * local_size + self.groups.local_rank] for m in range(nodes)]
        if all(b == b_max for b in mine):
            return summed.reshape(-1)
        blocks = summed.view(nodes, b_max, -1)
        return torch.cat([blocks[m, : mine[m]].reshape(-1) for m in range(nodes)])

    def _across_nodes(
        self, send: torch.Tensor, batches: list[int], batch: int
    ) -> Awaitable[torch.Tensor]:
        """Each sample's full sums to its rank, between ranks of the same local rank."""
        local_size = self.groups.layout.local_world_size
        width = self._node_width[self.groups.node]
        send_sizes = [
            batches[m * local_size + self.groups.local_rank] * width
            for m in range(self.groups.layout.nodes)
        ]
        recv_sizes = [batch * w for w in self._node_width]
        pending = start_all_to_all_single(
            send, recv_sizes, send_sizes, self.groups.cross, differentiable=True, qcomms=self.qcomms
        )
        return Mapped(pending, lambda flat: self._module_columns(flat, batch, recv_sizes))

    def _module_columns(
        self, flat: torch.Tensor, batch: int, recv_sizes: list[int]
    ) -> torch.Tensor:
        """The received node blocks side by side, in the module's column order."""
        parts = [
            part.view(batch, w)
            for part, w in zip(torch.split(flat, recv_sizes), self._node_width, strict=True)
            if w
        ]
        values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self._to_module is not None:
            values = values.index_select(1, self._to_module)
        return values

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        return self.compute_and_output_dist(self.input_dist(kjt).wait())

    def compute_and_output_dist(self, ctx: Received) -> KeyedTensor:
        return self.compute_and_start_output_dist(ctx).wait()

    def compute_and_start_output_dist(self, ctx: Received) -> Awaitable[KeyedTensor]:
        """The lookup, then the output distribution started (``wait()`` finishes it)."""
        routed, got = ctx.routed, ctx.got
        node = self.groups.node
        got, senders = take_key_strides(
            got, len(self.units_of[self.env.rank]), len(self._node_keys[node])
        )
        if senders is None and ctx.strides is None:
            values = self.output_dist(self.compute(got), got, routed.stride())
        else:
            senders = senders or [None] * len(got.batch_per_rank)
            values = self.output_dist_per_key(
                self.compute(got), got, senders, ctx.strides, routed.stride()
            )
        return Mapped(values, lambda v: self._pooled(v, routed))

    def output_dist_per_key(
        self,
        out: torch.Tensor | None,
        got: comm.JaggedAllToAllResult,
        senders: list[list[int] | None],
        strides: list[int] | None,
        batch: int,
    ) -> Awaitable[torch.Tensor]:
        """:meth:`output_dist` when some rank sent its keys' strides: that sender's rows travel
        at its keys' own strides (``senders[s]``: sender ``s``'s, for our node's units; None:
        a plain block), in both collectives; ``strides``: ours, per pair (None: plain), padded
        to ``batch`` at the end. The sums this local rank gets from the reduce-scatter are the
        send buffer across nodes as they are."""
        layout, node = self.groups.layout, self.groups.node
        nodes, local_size = layout.nodes, layout.local_world_size
        batches = list(got.batch_per_rank)
        b_max, width = max(batches), self._node_width[node]
        cols = self._node_cols[node]
        link = nothing_to_send(self.device, got.weights)  # empty; carries the weights' gradient

        def size(s: int) -> int:
            per_key = senders[s]
            if per_key is None:
                return batches[s] * width
            return sum(n * c for n, c in zip(per_key, cols, strict=True))

        def rects_of(s: int) -> list[Rect]:
            per_key, start = senders[s], s * b_max * width
            if per_key is None:
                return [Rect(start, batches[s], width, width)]
            starts = [sum(cols[:j]) for j in range(len(cols))]
            return [
                Rect(start + c0, n, c, width)
                for n, c, c0 in zip(per_key, cols, starts, strict=True)
            ]

        # Sender (m, l)'s sums go to local rank l; l's are forwarded to the ranks (m, l).
        of_local = [[m * local_size + lr for m in range(nodes)] for lr in range(local_size)]
        mine = of_local[self.groups.local_rank]
        if width == 0:
            summed: Awaitable[torch.Tensor] = Ready(link)
        else:
            partial = self._node_partial(out, link, nodes * local_size * b_max, width)
            rects = [r for senders_of_l in of_local for s in senders_of_l for r in rects_of(s)]
            in_sizes = [sum(size(s) for s in senders_of_l) for senders_of_l in of_local]
            summed = start_reduce_scatter_rows(
                pack_rects(partial.reshape(-1), rects).view(-1, 1),
                in_sizes,
                in_sizes[self.groups.local_rank],
                self.groups.intra,
                qcomms=self.qcomms,
            )
        send_sizes = [size(s) if width else 0 for s in mine]
        plain = [batch * w for w in self._node_width]
        recv_sizes = (
            plain if strides is None else vbe_recv_sizes(strides, self._node_keys, self._node_cols)
        )

        def finish(flat: torch.Tensor) -> torch.Tensor:
            if strides is not None:
                flat = pad_received(flat, strides, self._node_keys, self._node_cols, batch)
            return self._module_columns(flat, batch, plain)

        def across(sums: torch.Tensor) -> Awaitable[torch.Tensor]:
            pending = start_all_to_all_single(
                sums.reshape(-1),
                recv_sizes,
                send_sizes,
                self.groups.cross,
                differentiable=True,
                qcomms=self.qcomms,
            )
            return Mapped(pending, finish)

        return Then(summed, across)

    def _pooled(self, values: torch.Tensor, routed: KeyedJaggedTensor) -> KeyedTensor:
        if any(self.means):
            lengths = routed.lengths().view(len(self.pairs), routed.stride())
            values = divide_mean_bags(values, lengths, [p.dim for p in self.pairs], self.means)
        return pooled_output(self.pairs, values, routed)

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


def node_row_blocks(
    table: str,
    sharding: str,
    blocks: Sequence[ShardMetadata],
    rows: int,
    layout: NodeLayout,
) -> tuple[list[ShardMetadata], int]:
    """Checks that ``blocks`` tile ``rows`` on ranks of one node, one block per rank; returns
    them in row order, and the node."""
    ordered = check_tiling(table, sharding, "row blocks", blocks, axis=0, total=rows)
    ranks = [b.rank for b in ordered]
    nodes = {layout.node_of(r) for r in ranks}
    if len(nodes) != 1:
        raise ValueError(
            f"{sharding} table {table!r}: row blocks on ranks {ranks} span nodes {sorted(nodes)};"
            f" with {layout.local_world_size} ranks per node (LOCAL_WORLD_SIZE) they must share"
            " one node"
        )
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"{sharding} table {table!r}: a rank holds two row blocks: {ranks}")
    return ordered, nodes.pop()


class NodeRowSharderBase(EmbeddingSharderBase):
    """What table-row-wise and grid sharders share: bags only (partial sums are added across a
    node), and the node layout.

    ``local_world_size``: ranks per node; None reads the launcher's ``LOCAL_WORLD_SIZE`` (one node
    when it is unset).
    """

    def __init__(
        self,
        module_type: type[nn.Module] = EmbeddingBagCollection,
        *,
        local_world_size: int | None = None,
    ) -> None:
        if module_type is not EmbeddingBagCollection:
            raise TypeError(f"{self.sharding_type} shards EmbeddingBagCollection only")
        super().__init__(module_type)
        self.local_world_size = local_world_size


class TableRowWiseSharder(NodeRowSharderBase):
    """Shards EmbeddingBagCollection tables onto one node each, split by rows across its ranks."""

    sharding_type = ShardingType.TABLE_ROW_WISE

    def shard(
        self,
        module: nn.Module,
        params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> nn.Module:
        self.check_plan(params, env)
        view = ModuleView.of(module, list(params))
        groups = node_groups(env, self.local_world_size)
        slices: dict[str, list[NodeSlice]] = {}
        for table, ps in params.items():
            rows, dim = view.global_shape(table)
            if ps.shards:
                check_full_span(table, self.sharding_type, ps.shards, axis=1, total=dim)
                given = [s for s in ps.shards if s.sizes[0]]
            else:
                given = even_row_shards(rows, dim, ps.ranks)
            blocks, node = node_row_blocks(table, self.sharding_type, given, rows, groups.layout)
            slices[table] = [NodeSlice(0, dim, node, tuple(blocks))]
        kind = f"{type(module).__name__} ({self.sharding_type})"
        return NodeRowShardedEmbedding(
            view, slices, groups, env, device, kind, qcomms=self.qcomms_of(params)
        )
