"""A managed-collision collection spread over ranks by bucket: each rank holds the id maps of the
buckets it owns, and remaps every rank's ids of those buckets.

::

    rank r's ids of table t ──bucket_of──▶ per bucket ──all-to-all──▶ the bucket's owner
    owner: one step of each of its buckets on the ids every rank sent it (the global batch's ids
           of that bucket, whatever the order)
    rows ◀──all-to-all (back to the rank each id came from)── owner
    evicted rows, counters ──all-reduce / all-gather──▶ every rank (resets, stats)

:meth:`~ShardedManagedCollisionCollection.route` is the first all-to-all alone (stateless: a
pipeline runs it a step ahead); :meth:`~ShardedManagedCollisionCollection.remap_routed` the rest.

Bucket ``g`` of the ``G`` buckets of all tables (table by table, buckets in order) belongs to rank
``g % world_size``, so tables of one bucket are spread like table-wise tables and a table of many
buckets over every rank.

A collection built on the meta device (its buckets' settings only) is sharded without ever
holding a map whole: each rank builds the buckets it owns, empty, on its device, and allocates
no other rank's; a collection with real (maybe trained) maps moves its owned buckets' state.

State: each rank holds its buckets' modules, registered under the unsharded collection's keys.
Its state dict lists every bucket's tensors under those keys, as ShardedTensors held whole by
the owner; only the counters (seven numbers a bucket) are plain tensors every rank holds (the
owners send them after each step), so that every rank answers :meth:`managed_table_counters`
alone, also right after loading a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardrec.distributed.async_comm import start_all_to_all_single
from shardrec.distributed.awaitables import Mapped
from shardrec.distributed.group_ref import GroupRef
from shardrec.distributed.types import Awaitable
from shardrec.modules.managed_collision import ManagedTableStats, MCHManagedCollisionModule
from shardrec.modules.mc_buckets import (
    BucketLayout,
    bucket_stats,
    counters_of,
    evicted_rows,
    held_ids,
    is_meta,
    split_by_bucket,
)
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_counters import empty_counters
from shardrec.sparse import KeyedJaggedTensor

__all__ = ["LocalIds", "RemapResult", "RoutedIds", "ShardedManagedCollisionCollection"]

_MODULES = "_managed_collision_modules"
_COUNTERS = "_counters"


@dataclass(frozen=True, slots=True)
class _Bucket:
    table: str
    index: int  # within its table
    owner: int
    prefix: str  # its keys' prefix, relative to the collection
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]  # key suffix -> shape, dtype


@dataclass(frozen=True, slots=True)
class LocalIds:
    """This rank's ids of every table, bucket by bucket in global bucket order."""

    grouped: list[torch.Tensor]  # per table, its ids in bucket order
    orders: list[torch.Tensor]  # per table, where each grouped id sits in the table's ids
    counts: list[int]  # ids per bucket, all tables' buckets in order


@dataclass(frozen=True, slots=True)
class RoutedIds:
    """This rank's ids sent to their buckets' owners (``route``), and the ids of this rank's
    buckets that every rank sent: what the stateful remapping (``remap_routed``) needs."""

    ids: LocalIds  # this rank's ids, as split
    counts_by_rank: list[list[int]]  # rank r's ids per bucket (every rank's LocalIds.counts)
    index: torch.Tensor  # the sent ids' positions in this rank's grouped ids
    send_splits: list[int]  # ids sent to each rank
    recv_splits: list[int]  # ids received from each rank
    received: torch.Tensor  # the ids of this rank's buckets, from every rank (rank order)


@dataclass(frozen=True, slots=True)
class RemapResult:
    """One remapping on this rank: rows per table (in ``table_ids`` order) and, per table with
    evictions (training only), the evicted rows of all ranks' buckets in row order."""

    rows: dict[str, torch.Tensor]
    evicted: dict[str, torch.Tensor | None]


class ShardedManagedCollisionCollection(nn.Module):
    """This rank's buckets of a :class:`ManagedCollisionCollection`, and the routing of ids to
    the owners of their buckets."""

    @property
    def _pg(self) -> dist.ProcessGroup | None:
        return None if self._group is None else self._group()

    def __init__(
        self,
        collection: ManagedCollisionCollection,
        rank: int,
        world_size: int,
        pg: dist.ProcessGroup | None,
        device: torch.device,
    ) -> None:
        super().__init__()
        self._rank = rank
        self._world_size = world_size
        # Weakly, so that destroy_process_group ends the group (shardrec.distributed.group_ref).
        self._group = None if pg is None else GroupRef.to(pg, type(self).__name__)
        self._device = device  # where the collectives' tensors live (NCCL needs the GPU)
        self._layouts: dict[str, BucketLayout] = collection.bucket_layouts()
        self._tables = list(self._layouts)
        self._buckets: list[_Bucket] = []
        self._held: dict[tuple[str, int], MCHManagedCollisionModule] = {}
        # Counters of the buckets held elsewhere, as their owners last sent them.
        self._mirrors: dict[tuple[str, int], torch.Tensor] = {}
        modules: dict[str, nn.Module] = {}
        self._num_counters = 0
        for table, buckets in collection.buckets_by_table().items():
            self._num_counters = counters_of(buckets[0]).numel()
            single = len(buckets) == 1
            owned: dict[str, nn.Module] = {}
            for b, module in enumerate(buckets):
                owner = len(self._buckets) % world_size
                prefix = f"{_MODULES}.{table}." + ("" if single else f"{b}.")
                shapes = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
                self._buckets.append(_Bucket(table, b, owner, prefix, shapes))
                # A meta bucket (built to be sharded) is only its settings: each rank builds its
                # own buckets empty where they live and never allocates the others'. A real one
                # (maybe trained) moves with its state.
                meta = is_meta(module)
                if owner == rank:
                    if meta:
                        module = module.empty_like(device=device)
                    else:
                        module.to(device)
                    self._held[(table, b)] = module
                    owned[str(b)] = module
                elif meta:
                    self._mirrors[(table, b)] = empty_counters(module.capacity)
                else:
                    self._mirrors[(table, b)] = counters_of(module).detach().cpu().clone()
            if single and owned:
                modules[table] = owned["0"]
            elif owned:
                modules[table] = nn.ModuleDict(owned)
        self._managed_collision_modules = nn.ModuleDict(modules)
        # Fixed by the layout: each rank's buckets (global order), and each table's first bucket.
        self._by_owner = [
            [g for g, b in enumerate(self._buckets) if b.owner == r] for r in range(world_size)
        ]
        self._first_bucket = {
            t: next(g for g, b in enumerate(self._buckets) if b.table == t) for t in self._tables
        }
        self._features = collection.table_features()
        self.register_state_dict_post_hook(_state_dict_hook)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_load_pre_hook)  # type: ignore[no-untyped-call]

    # ---- queries ------------------------------------------------------------------------------

    def bucket_layouts(self) -> dict[str, BucketLayout]:
        return dict(self._layouts)

    def bucket_owners(self) -> dict[str, list[int]]:
        """Per table, the rank that holds each of its buckets."""
        out: dict[str, list[int]] = {t: [] for t in self._tables}
        for bucket in self._buckets:
            out[bucket.table].append(bucket.owner)
        return out

    def held_buckets(self) -> dict[str, dict[int, MCHManagedCollisionModule]]:
        """Per table, this rank's buckets by index."""
        out: dict[str, dict[int, MCHManagedCollisionModule]] = {t: {} for t in self._tables}
        for (table, b), module in self._held.items():
            out[table][b] = module
        return out

    def held_ids(self) -> dict[str, dict[int, int]]:
        """Per table, ``{raw id: row}`` of the ids this rank's buckets hold (the table's map is
        the union over ranks)."""
        return {t: held_ids(m, self._layouts[t]) for t, m in self.held_buckets().items()}

    def stats(self) -> dict[str, ManagedTableStats]:
        """Per table, the counters of the whole table (every rank gives the same)."""
        counters: dict[str, list[torch.Tensor]] = {t: [] for t in self._tables}
        for bucket in self._buckets:
            key = (bucket.table, bucket.index)
            held = self._held.get(key)
            counters[bucket.table].append(
                counters_of(held) if held is not None else self._mirrors[key]
            )
        return {t: bucket_stats(c, self._layouts[t]) for t, c in counters.items()}

    def managed_table_counters(self) -> dict[str, ManagedTableStats]:
        return self.stats()

    def table_ids(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self._features.table_ids(features)

    def with_rows(
        self, features: KeyedJaggedTensor, rows: Mapping[str, torch.Tensor]
    ) -> KeyedJaggedTensor:
        return self._features.with_rows(features, rows)

    # ---- one remapping ------------------------------------------------------------------------

    def split(self, ids: Mapping[str, torch.Tensor]) -> LocalIds:
        """This rank's ids of each table (``table_ids``) grouped by bucket."""
        grouped: list[torch.Tensor] = []
        orders: list[torch.Tensor] = []
        counts: list[int] = []
        for table in self._tables:
            order, by_bucket, per_bucket = split_by_bucket(ids[table], self._layouts[table])
            grouped.append(by_bucket)
            orders.append(order)
            counts += per_bucket
        return LocalIds(grouped, orders, counts)

    def remap(self, ids: LocalIds, counts_by_rank: list[list[int]]) -> RemapResult:
        """Rows of this rank's ids (per table, in ``table_ids`` order); a training step of this
        rank's buckets when training. ``counts_by_rank[r]``: rank r's ``LocalIds.counts``.
        Collective: every rank calls it. The same as :meth:`remap_routed` of :meth:`route`."""
        return self.remap_routed(self.route(ids, counts_by_rank).wait())

    def route(self, ids: LocalIds, counts_by_rank: list[list[int]]) -> Awaitable[RoutedIds]:
        """Send this rank's ids to their buckets' owners; returns with the all-to-all in flight.
        Reads and changes no bucket (the layout alone decides where an id goes), so a pipeline
        may route batch i+1 while batch i trains. Collective: every rank calls it."""
        local = torch.cat(ids.grouped) if ids.grouped else torch.empty(0, dtype=torch.int64)
        mine = counts_by_rank[self._rank]
        starts = [0]
        for n in mine:
            starts.append(starts[-1] + n)
        # Sent to the owners: buckets in (owner, bucket) order.
        send_order = [g for gs in self._by_owner for g in gs]
        index = torch.cat(
            [torch.arange(starts[g], starts[g + 1]) for g in send_order]
            or [torch.empty(0, dtype=torch.int64)]
        ).to(local.device)
        send = local.index_select(0, index)
        owned = self._by_owner[self._rank]
        send_splits = [sum(mine[g] for g in gs) for gs in self._by_owner]
        recv_splits = [sum(row[g] for g in owned) for row in counts_by_rank]
        pending = start_all_to_all_single(send, recv_splits, send_splits, self._pg)
        return Mapped(
            pending,
            lambda received: RoutedIds(
                ids, counts_by_rank, index, send_splits, recv_splits, received
            ),
        )

    def remap_routed(self, routed: RoutedIds) -> RemapResult:
        """:meth:`remap` once the ids are with their owners: each owned bucket steps on them
        (training: admissions, evictions, counters), the rows go back and the evictions are
        shared. Collective: every rank calls it, for the batches in the order they were routed."""
        ids, counts_by_rank = routed.ids, routed.counts_by_rank
        grouped, orders = ids.grouped, ids.orders
        index, send_splits, recv_splits = routed.index, routed.send_splits, routed.recv_splits
        received = routed.received
        owned = self._by_owner[self._rank]
        # Step each owned bucket on the ids of every rank (rank order).
        blocks = torch.split(received, recv_splits)
        per_rank = [
            torch.split(block, [counts_by_rank[r][g] for g in owned])
            for r, block in enumerate(blocks)
        ]
        answers: list[list[torch.Tensor]] = [[] for _ in range(self._world_size)]
        for i, g in enumerate(owned):
            bucket = self._buckets[g]
            layout = self._layouts[bucket.table]
            module = self._held[(bucket.table, bucket.index)]
            pieces = [per_rank[r][i] for r in range(self._world_size)]
            stepped = layout.table_rows(bucket.index, module(torch.cat(pieces)))
            for r, part in enumerate(torch.split(stepped, [p.numel() for p in pieces])):
                answers[r].append(part)
        reply = torch.cat([torch.cat(a) if a else received[:0] for a in answers])
        back = self._all_to_all(reply, send_splits, recv_splits)
        local_rows = received.new_empty(sum(send_splits))  # this rank's ids' rows
        local_rows.index_copy_(0, index, back)
        rows: dict[str, torch.Tensor] = {}
        at = 0
        for table, order, by_bucket in zip(self._tables, orders, grouped, strict=True):
            part = local_rows[at : at + by_bucket.numel()]
            at += by_bucket.numel()
            out = torch.empty_like(part)
            out.index_copy_(0, order, part)
            rows[table] = out
        evicted: dict[str, torch.Tensor | None] = {}
        if self.training:
            evicted = self._share_evictions(owned)
        return RemapResult(rows, evicted)

    def _share_evictions(self, owned: list[int]) -> dict[str, torch.Tensor | None]:
        """Every bucket's evicted rows and counters, from their owners to every rank."""
        found: dict[int, torch.Tensor] = {}
        for table, buckets in self.held_buckets().items():
            rows = evicted_rows(buckets, self._layouts[table])
            base = self._first_bucket[table]
            found.update({base + b: r for b, r in rows.items()})
        width = 1 + self._num_counters
        shared = torch.zeros(len(self._buckets), width, dtype=torch.int64)
        for g in owned:
            bucket = self._buckets[g]
            shared[g, 0] = found[g].numel() if g in found else 0
            shared[g, 1:] = counters_of(self._held[(bucket.table, bucket.index)]).cpu()
        if self._world_size > 1 and self._pg is not None:
            on_device = shared.to(self._device)
            dist.all_reduce(on_device, group=self._pg)
            shared = on_device.cpu()
        for g, bucket in enumerate(self._buckets):
            if bucket.owner != self._rank:
                self._mirrors[(bucket.table, bucket.index)].copy_(shared[g, 1:])
        counts = shared[:, 0].tolist()
        if sum(counts) == 0:
            return dict.fromkeys(self._tables)
        device = next(iter(found.values())).device if found else torch.device("cpu")
        mine = torch.cat(
            [found[g] for g in owned if g in found] or [torch.empty(0, dtype=torch.int64)]
        )
        by_rank = self._by_owner
        totals = [sum(counts[g] for g in gs) for gs in by_rank]
        if self._world_size > 1 and self._pg is not None:
            padded = torch.zeros(max(totals), dtype=torch.int64, device=self._device)
            padded[: mine.numel()] = mine.to(self._device)
            gathered = [torch.empty_like(padded) for _ in range(self._world_size)]
            dist.all_gather(gathered, padded, group=self._pg)
            blocks = [b.cpu() for b in gathered]
        else:
            blocks = [mine.cpu()]
        rows_of: dict[int, torch.Tensor] = {}
        for r, gs in enumerate(by_rank):
            pieces = torch.split(blocks[r][: totals[r]], [counts[g] for g in gs])
            rows_of.update(dict(zip(gs, pieces, strict=True)))
        out: dict[str, torch.Tensor | None] = {}
        for table in self._tables:
            parts = [
                rows_of[g]
                for g, b in enumerate(self._buckets)
                if b.table == table and counts[g] > 0
            ]
            out[table] = torch.cat(parts).to(device) if parts else None
        return out

    def _all_to_all(
        self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]
    ) -> torch.Tensor:
        if self._world_size == 1 or self._pg is None:
            return x
        out = torch.empty(sum(out_splits), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x, out_splits, in_splits, group=self._pg)
        return out

    # ---- state ------------------------------------------------------------------------------

    def _sharded(self, bucket: _Bucket, suffix: str, local: torch.Tensor | None) -> Any:
        """A tensor of one bucket as a ShardedTensor held whole by its owner."""
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor.api import ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import (
            ShardedTensorMetadata,
            TensorProperties,
        )
        from torch.distributed._shard.sharded_tensor.shard import Shard

        shape, dtype = bucket.shapes[suffix]
        device = local.device if local is not None else torch.device("cpu")
        meta = ShardMetadata([0] * len(shape), list(shape), f"rank:{bucket.owner}/{device}")
        shards = [Shard(local, meta)] if local is not None else []
        gmeta = ShardedTensorMetadata([meta], torch.Size(shape), TensorProperties(dtype=dtype))
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, gmeta, process_group=self._pg
        )


def _state_dict_hook(
    module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Every bucket's tensors under the unsharded keys: ShardedTensors held by the bucket's owner,
    and the counters as plain tensors on every rank."""
    from shardrec.distributed.checkpoint.sharded_state import quiet_sharded_tensor

    assert isinstance(module, ShardedManagedCollisionCollection)
    if module._pg is None:
        return  # one process (maybe without torch.distributed): it holds every bucket
    with quiet_sharded_tensor():
        for bucket in module._buckets:
            mine = bucket.owner == module._rank
            for suffix in bucket.shapes:
                key = prefix + bucket.prefix + suffix
                if suffix == _COUNTERS:
                    if not mine:
                        state[key] = module._mirrors[(bucket.table, bucket.index)]
                    continue
                state[key] = module._sharded(bucket, suffix, state[key] if mine else None)


def _load_pre_hook(
    module: nn.Module,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` with the unsharded keys: this rank's buckets take their tensors (full
    tensors, or ShardedTensors holding them here), the others only their counters."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    assert isinstance(module, ShardedManagedCollisionCollection)
    for bucket in module._buckets:
        mine = bucket.owner == module._rank
        for suffix in bucket.shapes:
            key = prefix + bucket.prefix + suffix
            if key not in state:
                continue
            value = state[key]
            if isinstance(value, ShardedTensor):
                local = value.local_shards()
                if mine and len(local) != 1:
                    error_msgs.append(f"{key}: the ShardedTensor does not hold this bucket here")
                    continue
                value = local[0].tensor if local else None
            if not mine:
                if suffix == _COUNTERS and value is not None:
                    module._mirrors[(bucket.table, bucket.index)].copy_(value)
                del state[key]
            else:
                state[key] = value
