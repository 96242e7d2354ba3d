"""The per-rank model of a placed plan: what each rank computes, reads and sends, and its step.

A rank's step is its compute plus its communication, each link class at its own bandwidth:

    step[r] = overhead + compute[r] + max(sent_intra[r], received_intra[r]) / intra_host_bw
                         + max(sent_inter[r], received_inter[r]) / inter_host_bw

(links are full duplex: sending and receiving overlap, the larger one bounds the time; ``overhead``
is the topology's fixed ``step_overhead``, 0 unless calibrated; a shard's ``collective_extra``, the
time its outputs' reduce-scatter takes beyond their bytes at the links' bandwidth, is added to its
owner's communication, and every rank's communication adds ``collective_latency`` per collective:
each module and sharding type's ``collectives``, counted once; every rank's compute adds the
``sender_compute`` of every shard, the work on the ids it sends them). The plan's
step is the slowest rank's. A rank's bytes come from two roles (per-shard figures in
``estimators.py``):

- as the owner of shards: it receives ``to_owner`` from, and sends ``from_owner`` to, each of its
  L-1 host peers (intra) and W-L other ranks (inter);
- as a peer of every other rank's shards: it sends ``to_owner`` to, and receives ``from_owner``
  from, each shard's owner, intra if the owner is on its host, else inter;
- an owner also sends and receives ``owner_intra`` inside its host (table-row-wise's reduction);
- every rank sends and receives the replicas' all-reduce.

With per-rank sums T_r (``to_owner`` of the shards it owns), F_r, per-host sums T_h, F_h and the
totals T, F, rank r on host h sends T_h - T_r + (L-1)·F_r inside its host and T - T_h + (W-L)·F_r
beyond it; it receives F_h - F_r + (L-1)·T_r and F - F_h + (W-L)·T_r. So one plan is evaluated in
O(ranks + shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shardrec.distributed.planner.topology import Topology
from shardrec.distributed.planner.types import ShardingOption


@dataclass(frozen=True, slots=True)
class RankLoad:
    """Per rank: bytes of storage (HBM, DDR), seconds per step, and what makes them up."""

    hbm: tuple[int, ...]
    ddr: tuple[int, ...]
    perf: tuple[float, ...]  # the rank's step: compute + communication
    compute: tuple[float, ...]
    read: tuple[float, ...]  # embedding bytes read per step (forward)
    sent_intra: tuple[float, ...]
    sent_inter: tuple[float, ...]
    received_intra: tuple[float, ...]
    received_inter: tuple[float, ...]
    # Seconds of collectives beyond their bytes at the links' bandwidth (``ShardCost``), their
    # fixed latency included.
    collective_extra: tuple[float, ...] = ()

    @property
    def step(self) -> float:
        return max(self.perf)

    @property
    def slowest(self) -> int:
        return int(np.argmax(self.perf))

    def comm(self, rank: int, topology: Topology) -> float:
        extra = self.collective_extra[rank] if self.collective_extra else 0.0
        return (
            max(self.sent_intra[rank], self.received_intra[rank]) / topology.intra_host_bw
            + max(self.sent_inter[rank], self.received_inter[rank]) / topology.inter_host_bw
            + extra
        )


def _tuple(values: np.ndarray) -> tuple[float, ...]:
    return tuple(values.astype(np.float64).tolist())


def evaluate(
    options: Sequence[ShardingOption],
    topology: Topology,
    hbm: np.ndarray,
    ddr: np.ndarray,
) -> RankLoad:
    """The per-rank load of placed ``options`` (every shard has a rank); ``hbm``/``ddr`` are the
    storage the partitioner already summed."""
    w, local = topology.world_size, topology.ranks_per_host
    hosts = w // local
    compute = np.zeros(w)
    read = np.zeros(w)
    to_owner = np.zeros(w)
    from_owner = np.zeros(w)
    own_intra = np.zeros(w)
    extra = np.zeros(w)
    ar_intra = ar_inter = 0.0
    sender = 0.0  # seconds every rank spends on the ids it sends (row splits' routing)
    # Collectives per (module, sharding type): its tables share them.
    collectives: dict[tuple[str, str], int] = {}
    for option in options:
        first = option.shards[0].cost
        key = (option.table.module_path, option.sharding_type)
        collectives[key] = max(collectives.get(key, 0), first.collectives)
        # A replica on every rank (data-parallel), each costing the same: add it to all ranks at
        # once, and its all-reduce once per rank.
        if (
            (first.allreduce_intra > 0 or first.allreduce_inter > 0)
            and len(option.shards) == w
            and len({s.rank for s in option.shards}) == w
        ):
            compute += first.compute
            read += first.read_bytes
            to_owner += first.to_owner
            from_owner += first.from_owner
            own_intra += first.owner_intra
            ar_intra += first.allreduce_intra
            ar_inter += first.allreduce_inter
            continue
        replicated = False
        for shard in option.shards:
            assert shard.rank is not None
            c = shard.cost
            compute[shard.rank] += c.compute
            read[shard.rank] += c.read_bytes
            to_owner[shard.rank] += c.to_owner
            from_owner[shard.rank] += c.from_owner
            own_intra[shard.rank] += c.owner_intra
            extra[shard.rank] += c.collective_extra
            sender += c.sender_compute
            replicated = replicated or c.allreduce_intra > 0 or c.allreduce_inter > 0
        if replicated:
            # Every replica carries the same all-reduce; count it once per rank.
            ar_intra += first.allreduce_intra
            ar_inter += first.allreduce_inter
    compute += sender
    if w > 1:
        extra += sum(collectives.values()) * topology.collective_latency
    t_host = np.repeat(to_owner.reshape(hosts, local).sum(axis=1), local)
    f_host = np.repeat(from_owner.reshape(hosts, local).sum(axis=1), local)
    t_all, f_all = to_owner.sum(), from_owner.sum()
    sent_intra = t_host - to_owner + (local - 1) * from_owner + own_intra + ar_intra
    sent_inter = t_all - t_host + (w - local) * from_owner + ar_inter
    recv_intra = f_host - from_owner + (local - 1) * to_owner + own_intra + ar_intra
    recv_inter = f_all - f_host + (w - local) * to_owner + ar_inter
    if w == 1:
        sent_intra = sent_inter = recv_intra = recv_inter = np.zeros(w)
    perf = (
        topology.step_overhead
        + compute
        + extra
        + np.maximum(sent_intra, recv_intra) / topology.intra_host_bw
        + np.maximum(sent_inter, recv_inter) / topology.inter_host_bw
    )
    return RankLoad(
        hbm=tuple(hbm.astype(np.int64).tolist()),
        ddr=tuple(ddr.astype(np.int64).tolist()),
        perf=_tuple(perf),
        compute=_tuple(compute),
        read=_tuple(read),
        sent_intra=_tuple(sent_intra),
        sent_inter=_tuple(sent_inter),
        received_intra=_tuple(recv_intra),
        received_inter=_tuple(recv_inter),
        collective_extra=_tuple(extra),
    )
