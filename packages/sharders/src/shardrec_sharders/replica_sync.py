"""Keeps the replicas of data-parallel tables that have a fused optimizer identical.

Each rank looks its own batch up in its own replica, a ``TableBatchedEmbedding`` built with
``deferred_update=True``: backward keeps each table's dense gradient inside the lookup and marks
the rows it read an id of (the tables' parameters do not require grad, as under every fused
sharding: DDP and torch optimizers never see them). When every group of tables has its gradient
(the lookup's update hook), one all-reduce sums over the ranks one flat fp32 buffer: every table's
dense gradient, then every table's touched-row mask. Every rank then applies the fused optimizer to
the rows that *any* rank touched, from the same summed gradient: the same update on every replica,
bit for bit, and the same update the unsharded module makes on the global batch.

Gradients are summed over ranks, not averaged: a row's gradient is the sum over every sample that
read it, as under every other sharding (and as the unsharded module computes it on the global
batch). Rows no rank touched keep their weights and optimizer state (Adam's moments too), as in
fused mode.

Why a dense all-reduce rather than an all-gather of (touched ids, their gradient rows): a ring
all-reduce of a table of S = rows·dim·4 bytes moves about 2·S per rank whatever the batch; the
all-gather moves W·n·(8 + 4·dim) per rank, n the distinct ids per rank, W the ranks. The dense one
is the smaller while ``2·rows < W·n`` roughly, which holds for the small tables the planner makes
data-parallel (and the planner prices exactly this all-reduce), and it needs no host read of the
id counts. The all-gather is not built: a large table belongs to a sharded layout, not to
data-parallel.

Every rank must run backward through the replica once per forward it trains on (the all-reduce is
a collective), as with the other shardings' backward all-to-alls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardrec.distributed.group_ref import GroupRef
from shardrec.kernels import TableBatchedEmbedding

__all__ = ["ReplicaSync"]


class ReplicaSync:
    """Sums a replica's table gradients over ``pg`` after backward, then applies its fused
    optimizer (see the module docstring). ``pg`` None: one process, nothing to sum."""

    def __init__(self, lookup: TableBatchedEmbedding, pg: dist.ProcessGroup | None) -> None:
        if not lookup.deferred_update:
            raise ValueError("ReplicaSync needs a lookup built with deferred_update=True")
        self.lookup = lookup
        # Weakly, so that destroy_process_group ends the group (shardrec.distributed.group_ref).
        self._group = None if pg is None else GroupRef.to(pg, "ReplicaSync")
        lookup.register_update_hook(lambda _: self.step())

    @property
    def pg(self) -> dist.ProcessGroup | None:
        return None if self._group is None else self._group()

    def _world(self) -> int:
        return 1 if self.pg is None else dist.get_world_size(self.pg)

    def broadcast_from_first_rank(self) -> None:
        """Make every replica rank 0's (weights and optimizer state): replicas built or
        initialised apart (a model built on meta, or without a common seed) start equal."""
        if self._world() == 1 or self.lookup.device.type == "meta":
            return
        tensors = list(self.lookup.table_weights().values())
        for states in self.lookup.optimizer_states().values():
            tensors.extend(t for t in states.values() if t.dim() > 0)
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.broadcast(flat, group_src=0, group=self.pg)
        with torch.no_grad():
            for t, piece in zip(
                tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True
            ):
                t.copy_(piece.view_as(t))

    def step(self) -> None:
        """Sum the gradients and touched rows over the ranks and apply the fused update."""
        grads = self.lookup.take_gradients()
        touched = self.lookup.take_touched_rows()
        names = list(grads)
        pieces = [grads[n].reshape(-1) for n in names]
        pieces += [touched[n].to(torch.float32) for n in names]
        flat = torch.cat(pieces)
        if self._world() > 1:
            dist.all_reduce(flat, group=self.pg)
        parts = torch.split(flat, [p.numel() for p in pieces])
        count = len(names)
        summed = {n: parts[i].view(grads[n].shape) for i, n in enumerate(names)}
        rows = {n: parts[count + i].nonzero().squeeze(1) for i, n in enumerate(names)}
        self.lookup.apply_update(summed, rows)
