"""A managed table split into buckets: each bucket maps the ids of its own slice of the id space
into its own range of the table's rows.

::

    table of 14 rows, 3 buckets: capacity 13 = 5 + 4 + 4 rows, row 13 the shared default row
    bucket      0            1             2
    rows        0 1 2 3 4    5 6 7 8       9 10 11 12      13: default row of every bucket
    ids         bucket_of(id) = a hash of the id (bits unrelated to the id map's slot hash)

Bucket ``b`` is an :class:`MCHManagedCollisionModule` of ``size(b) + 1`` rows whose own default
row (its last) stands for the table's default row. A training step of the table steps every bucket
on the ids that hash to it (also on none), so what a bucket does depends only on its own state and
on the multiset of its own ids: a sharded module whose ranks each own some buckets and receive
their ids from every rank is the same function as the unsharded module with as many buckets.

One bucket is the table as one :class:`MCHManagedCollisionModule`: ids are not hashed, and the
module's rows are the table's rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import torch

from shardrec.modules.managed_collision import ManagedTableStats, MCHManagedCollisionModule
from shardrec.modules.mc_counters import (
    ADMITTED,
    BELOW,
    EVICTED,
    FREE,
    REJECTED,
    STEP,
)
from shardrec.modules.mc_policies import require_int

__all__ = [
    "BucketLayout",
    "bucket_stats",
    "counters_of",
    "evicted_rows",
    "held_ids",
    "is_meta",
    "make_buckets",
    "remap_buckets",
    "split_by_bucket",
]

# splitmix64's finaliser constants (as int64): the bucket of an id comes from all its bits,
# mixed otherwise than the id map's Fibonacci slot hash, so the ids of one bucket still spread
# over all the slots of its map.
_MIX1: Final = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2: Final = -7723592293110705685  # 0x94D049BB133111EB
_LOW32: Final = (1 << 32) - 1


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


@dataclass(frozen=True, slots=True)
class BucketLayout:
    """How a managed table of ``num_embeddings`` rows splits into ``num_buckets`` buckets.

    The table's capacity (``num_embeddings - 1`` rows: the last row is the default row) is cut
    into contiguous ranges, bucket 0 first, whose sizes differ by at most one; every bucket holds
    at least one row, so ``num_buckets <= num_embeddings - 1``.
    """

    num_embeddings: int
    num_buckets: int

    def __post_init__(self) -> None:
        require_int(self.num_embeddings, 2, "BucketLayout: num_embeddings")
        require_int(self.num_buckets, 1, "BucketLayout: num_buckets")
        if self.num_buckets > self.num_embeddings - 1:
            raise ValueError(
                f"BucketLayout: {self.num_buckets} buckets for a table of {self.num_embeddings}"
                f" rows: each bucket needs a row of its own besides the default row (at most"
                f" {self.num_embeddings - 1} buckets)"
            )

    @property
    def capacity(self) -> int:
        return self.num_embeddings - 1

    @property
    def default_row(self) -> int:
        return self.num_embeddings - 1

    def size(self, bucket: int) -> int:
        """Rows ids can hold in ``bucket``."""
        base, extra = divmod(self.capacity, self.num_buckets)
        return base + (1 if bucket < extra else 0)

    def first_row(self, bucket: int) -> int:
        base, extra = divmod(self.capacity, self.num_buckets)
        return bucket * base + min(bucket, extra)

    def bucket_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The bucket of each id (int64, ``[0, num_buckets)``)."""
        if self.num_buckets == 1:
            return torch.zeros_like(ids, dtype=torch.int64)
        x = ids.to(torch.int64)
        x = (x ^ _shift_right(x, 30)) * _MIX1
        x = (x ^ _shift_right(x, 27)) * _MIX2
        x = x ^ _shift_right(x, 31)
        # The top 32 bits scaled to [0, num_buckets): no modulo bias.
        return (_shift_right(x, 32) * self.num_buckets) >> 32

    def table_rows(self, bucket: int, rows: torch.Tensor) -> torch.Tensor:
        """A bucket module's rows as the table's rows (its default row is the table's)."""
        if self.num_buckets == 1:
            return rows
        size = self.size(bucket)
        return torch.where(rows == size, self.default_row, rows + self.first_row(bucket))


def make_buckets(
    template: MCHManagedCollisionModule, layout: BucketLayout, table: str
) -> list[MCHManagedCollisionModule]:
    """``layout.num_buckets`` modules with ``template``'s policy, interval and admission, on its
    device; with one bucket, ``template`` itself. ``template`` must be untrained (its state is
    not split). On the meta device the buckets take no memory (for the planner, which sizes
    them from their buffers' shapes)."""
    if template.output_size() != layout.num_embeddings:
        raise ValueError(
            f"managed table {table!r}: its module maps into {template.output_size()} rows, the"
            f" table has {layout.num_embeddings}"
        )
    if layout.num_buckets == 1:
        return [template]
    counters = counters_of(template)
    # A meta module holds no values, so it cannot have trained (and its counters cannot be read).
    if not counters.is_meta and template.stats().steps != 0:
        raise ValueError(
            f"managed table {table!r}: the module given for {layout.num_buckets} buckets has"
            " trained already; buckets start empty, so give an untrained module (only its"
            " settings are used)"
        )
    return [
        template.empty_like(layout.size(b) + 1, name=f"{table}[{b}]")
        for b in range(layout.num_buckets)
    ]


def split_by_bucket(
    ids: torch.Tensor, layout: BucketLayout
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(order, ids in bucket order, ids per bucket)``: ``ids[order]`` lists bucket 0's ids
    first (each bucket's in their given order)."""
    bucket = layout.bucket_of(ids)
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=layout.num_buckets)
    return order, ids.index_select(0, order), counts.tolist()


def remap_buckets(
    buckets: Sequence[MCHManagedCollisionModule], layout: BucketLayout, ids: torch.Tensor
) -> torch.Tensor:
    """Rows of ``ids`` (a training step of every bucket when they train, a lookup otherwise)."""
    if layout.num_buckets == 1:
        rows: torch.Tensor = buckets[0](ids)
        return rows
    order, grouped, counts = split_by_bucket(ids.to(torch.int64), layout)
    pieces = torch.split(grouped, counts)
    grouped_rows = torch.cat(
        [
            layout.table_rows(b, m(piece))
            for b, (m, piece) in enumerate(zip(buckets, pieces, strict=True))
        ]
    )
    out = torch.empty_like(grouped_rows)
    out.index_copy_(0, order, grouped_rows)
    return out


def evicted_rows(
    buckets: Mapping[int, MCHManagedCollisionModule], layout: BucketLayout
) -> dict[int, torch.Tensor]:
    """Per bucket with evictions since the last call, its evicted rows as table rows (sorted)."""
    out: dict[int, torch.Tensor] = {}
    for b in sorted(buckets):
        rows = buckets[b].evict()
        if rows is not None and rows.numel() > 0:
            out[b] = rows + layout.first_row(b)
    return out


def held_ids(
    buckets: Mapping[int, MCHManagedCollisionModule], layout: BucketLayout
) -> dict[int, int]:
    """``{raw id: table row}`` of every id held by ``buckets``."""
    out: dict[int, int] = {}
    for b, m in buckets.items():
        first = layout.first_row(b)
        out.update({i: r + first for i, r in m.held_ids().items()})
    return out


def bucket_stats(counters: Sequence[torch.Tensor], layout: BucketLayout) -> ManagedTableStats:
    """The table's counters from its buckets' ``_counters`` buffers, in bucket order."""
    if len(counters) != layout.num_buckets:
        raise ValueError(f"bucket_stats: {len(counters)} counters for {layout.num_buckets} buckets")
    c = torch.stack([t.detach().cpu() for t in counters]).sum(0).tolist()
    steps = max(int(t[STEP]) for t in counters)
    return ManagedTableStats(
        capacity=layout.capacity,
        occupancy=layout.capacity - c[FREE],
        steps=steps,
        admitted_total=c[ADMITTED],
        evicted_total=c[EVICTED],
        rejected_total=c[REJECTED],
        below_threshold_total=c[BELOW],
    )


def counters_of(module: MCHManagedCollisionModule) -> torch.Tensor:
    """A bucket's counters buffer (what :func:`bucket_stats` reads)."""
    return module.get_buffer("_counters")


def is_meta(module: MCHManagedCollisionModule) -> bool:
    """Whether ``module``'s state is on the meta device (all of it: a mix is refused)."""
    devices = {b.is_meta for b in module.buffers()}
    if len(devices) > 1:
        raise ValueError(
            f"{module._where()}: some of its buffers are on the meta device and some are not;"
            " build it wholly on meta (to be materialised empty) or wholly on a real device"
        )
    return devices == {True}
