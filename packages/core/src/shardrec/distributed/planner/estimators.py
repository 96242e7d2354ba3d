"""Storage, bytes moved and time of one shard: simple, documented formulas to check by hand.

Notation (per step): B samples per rank, W ranks, L ranks per host, F features reading the table, P
ids per sample per feature (pooling factor), e bytes per weight element, ``cols`` the shard's
columns, ``rows`` its rows, N the table's rows, D its dimension. A *peer* is any other rank.

- ids a peer sends the shard, per peer: ALL_IDS B·F·P, ROW_SPLIT B·F·P · rows/N (ids spread evenly
  over the rows); the shard looks up W times that (its own rank's ids included).
- output a peer gets back, per peer: pooled B·F·cols (for ROW_SPLIT partial sums over the shard's
  columns, the full width D but for grid's column slices), sequence tables one row per id
  (ids · cols); the gradient of the same size comes back in the backward pass.
- so each peer sends the owner ``to_owner`` = 8·ids + e·output bytes and receives ``from_owner`` =
  e·output bytes; the owner receives ``to_owner`` from, and sends ``from_owner`` to, every peer.
- HOST_ROW_SPLIT (table-row-wise, rows over the L ranks of one host; grid, each column slice so):
  ids as ROW_SPLIT; the partial sums are reduce-scattered inside the host (the gradients
  all-gathered back), 2·(L-1)/L · W·B·F·cols·e bytes each way on the owner's host links, and each
  pooled row then crosses once: per peer e·B·F·cols/L each way on average.
- REPLICATED (data-parallel): nothing is exchanged forward; the dense gradient S = rows·cols·e is
  all-reduced in two levels: 2·(L-1)/L · S inside the host, 2·(H-1)/H · S/L between the H hosts,
  sent and received by every rank.
- storage = weights (rows·cols·e) + optimizer state (see OPTIMIZER_STATE) + input ids (8 bytes each)
  + output and its gradient (2 · output elements · e); REPLICATED adds its dense gradient. Weights
  and optimizer state count only where the table's storage backend keeps them in memory
  (``Workload.memory``, a :class:`shardrec.kernels.StorageMemory`; a file-backed table's are 0).
- compute: forward = (ids looked up · cols + output elements) · e / memory bandwidth, backward =
  that × the topology's ``bwd_compute_multiplier`` + ids looked up · ``backward_cost_per_id``.
- ROW_SPLIT's partial sums go by reduce-scatter and their gradients come back by all-gather;
  with ``Topology.reduce_scatter_bw`` set, the owner's (W-1)·from_owner bytes each way take that
  bandwidth instead of the links' (the difference is ``collective_extra``, added to the owner's
  time); HOST_ROW_SPLIT's ``owner_intra`` likewise.
- fixed costs per id and per collective (``Topology``'s, 0 by default): the owner spends
  ``receive_cost_per_id`` on each id it receives (part of its forward compute) and
  ``backward_cost_per_id`` on each id it looks up (part of its backward); every rank spends
  ``route_cost_per_id`` on each id it sends a row split (``sender_compute``: ROW_SPLIT and
  HOST_ROW_SPLIT, B·F·P · rows/N per shard); a module's tables sharded alike share
  ``COLLECTIVES_PER_STEP[traffic]`` collectives, ``collective_latency`` each (the per-rank model
  counts them once per module and sharding type).
- pooled output beyond its bytes (``Topology``'s, 0 by default): the owner spends
  ``output_cost_per_row`` on each pooled row it produces, B·F per sender (W senders; a replica's
  B·F are its own), forward and backward together, counted in its backward compute; every rank
  spends ``output_copy_cost_per_byte`` on each byte of pooled output it receives from the shard
  and copies into its module's output (``sender_compute``): ALL_IDS e·B·F·cols (the owners'
  blocks put in column order, the gradient taken apart), HOST_ROW_SPLIT on several hosts the row
  that crosses, e·B·F·cols/L on average (the hosts' sums joined); ROW_SPLIT's reduce-scatter (and
  HOST_ROW_SPLIT's on one host) writes the module's output in place and REPLICATED's lookup is
  the output, so 0 for those.
- ``perf``, the shard alone on an idle rank: compute + the owner's bytes over each link class:
  (L-1)·to_owner / intra-host bandwidth + (W-L)·to_owner / inter-host bandwidth (an owner receives
  at least what it sends, so receiving bounds its time on a full-duplex link). Where the rank also
  sends ids to other tables' shards, the partitioner's per-rank model adds that (see
  ``rank_model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shardrec.distributed.planner.layouts import Traffic
from shardrec.distributed.planner.topology import Topology
from shardrec.distributed.planner.types import PlannerTable, ShardCost
from shardrec.kernels.specs import OptimizerType, parse_optimizer
from shardrec.kernels.storage import IN_MEMORY, StorageMemory

INDEX_BYTES: Final = 8

# Each fused optimizer's state as (bytes per row, bytes per element), fp32 states (Adam's 0-d step
# counter is left out).
OPTIMIZER_STATE: Final[dict[OptimizerType, tuple[int, int]]] = {
    OptimizerType.SGD: (0, 0),
    OptimizerType.ROWWISE_ADAGRAD: (4, 0),
    OptimizerType.EXACT_ADAGRAD: (0, 4),
    OptimizerType.ADAM: (0, 8),
}


# Collectives a sharded module issues per step for its tables of one traffic pattern, forward and
# backward: the split exchange and the ids of the input all-to-all, then the outputs and their
# gradients (table-row-wise: a reduce-scatter in the host and an all-to-all across, each way);
# data-parallel: the batch-check vote and the gradients' all-reduce.
COLLECTIVES_PER_STEP: Final[dict[Traffic, int]] = {
    Traffic.ALL_IDS: 4,
    Traffic.ROW_SPLIT: 4,
    Traffic.HOST_ROW_SPLIT: 6,
    Traffic.REPLICATED: 2,
}


def optimizer_state_bytes(optimizer: OptimizerType | None, rows: int, cols: int) -> int:
    """Bytes of fused optimizer state of a ``rows`` × ``cols`` shard (None: no fused optimizer)."""
    if optimizer is None:
        return 0
    per_row, per_element = OPTIMIZER_STATE[optimizer]
    return per_row * rows + per_element * rows * cols


@dataclass(frozen=True, slots=True)
class Workload:
    """The per-table facts the estimates need, resolved from the planner defaults and
    constraints. ``optimizer``: the fused optimizer whose state the table carries (None: none; a
    name is parsed by :func:`shardrec.kernels.parse_optimizer`). ``memory``: which of the table's
    bytes its storage backend keeps in the rank's memory (the rest is not counted)."""

    batch_size: int
    pooling_factor: float
    optimizer: OptimizerType | None
    memory: StorageMemory = IN_MEMORY

    def __post_init__(self) -> None:
        if self.optimizer is not None:
            object.__setattr__(self, "optimizer", parse_optimizer(self.optimizer))


@dataclass(frozen=True, slots=True)
class ShardEstimate:
    weights: int
    optimizer_state: int
    io: int
    fwd_compute: float
    bwd_compute: float
    cost: ShardCost

    @property
    def storage(self) -> int:
        return self.weights + self.optimizer_state + self.io

    @property
    def perf(self) -> float:
        """Seconds per step of the shard alone on an otherwise idle rank."""
        return self.cost.alone


def owner_seconds_per_byte(topology: Topology) -> float:
    """Seconds an owner spends per byte each peer sends it: (L-1) peers on its host, W-L beyond."""
    w, local = topology.world_size, topology.ranks_per_host
    return (local - 1) / topology.intra_host_bw + (w - local) / topology.inter_host_bw


def allreduce_bytes(topology: Topology, size: float) -> tuple[float, float]:
    """Bytes every rank sends (and receives) inside its host and between hosts to all-reduce
    ``size`` bytes: reduce-scatter and all-gather in the host, all-reduce of 1/L across hosts."""
    w, local = topology.world_size, topology.ranks_per_host
    hosts = w // local
    return 2 * (local - 1) / local * size, 2 * (hosts - 1) / hosts * size / local


def estimate_shard(
    table: PlannerTable,
    rows: int,
    cols: int,
    traffic: Traffic,
    topology: Topology,
    workload: Workload,
) -> ShardEstimate:
    b, w, f, p, e = (
        workload.batch_size,
        topology.world_size,
        table.num_features,
        workload.pooling_factor,
        table.element_size,
    )
    share = rows / table.num_embeddings if table.num_embeddings else 0.0
    split = traffic in (Traffic.ROW_SPLIT, Traffic.HOST_ROW_SPLIT)
    ids_per_rank = b * f * p * (share if split else 1.0)
    # Pooled: B·F rows of the shard's columns (for row splits partial sums over them: the full
    # width for row-wise and table-row-wise, the column slice for grid); sequence: a row per id.
    out_per_rank = b * f * cols if table.pooled else ids_per_rank * cols
    senders = 1 if traffic is Traffic.REPLICATED else w
    ids, out_elems = ids_per_rank * senders, out_per_rank * senders

    dense = rows * cols * e
    weights = dense if workload.memory.weights else 0
    state = (
        optimizer_state_bytes(workload.optimizer, rows, cols)
        if workload.memory.optimizer_state
        else 0
    )
    io = round(ids * INDEX_BYTES + 2 * out_elems * e)
    lookup = (ids * cols + out_elems) * e / topology.memory_bw
    # Pooled rows the shard produces: B·F per sender (a sequence table's rows are its ids').
    out_rows = b * f * senders if table.pooled else 0.0
    bwd_compute = (
        lookup * topology.bwd_compute_multiplier
        + ids * topology.backward_cost_per_id
        + out_rows * topology.output_cost_per_row
    )
    # Laying out the received ids is forward work only (a replica receives none).
    received = 0.0 if traffic is Traffic.REPLICATED else ids
    fwd_compute = lookup + received * topology.receive_cost_per_id
    compute = fwd_compute + bwd_compute
    read = ids * cols * e
    sender = ids_per_rank * topology.route_cost_per_id if split else 0.0
    # Bytes of pooled output each rank copies into its module's output (see the module docstring).
    copied = 0.0
    if table.pooled and traffic is Traffic.ALL_IDS:
        copied = e * out_per_rank
    elif table.pooled and traffic is Traffic.HOST_ROW_SPLIT and w > topology.ranks_per_host:
        copied = e * out_per_rank / topology.ranks_per_host
    sender += copied * topology.output_copy_cost_per_byte
    collectives = COLLECTIVES_PER_STEP[traffic]
    if traffic is Traffic.REPLICATED:
        io += dense  # the dense gradient, in memory whatever the storage
        intra, inter = allreduce_bytes(topology, dense)
        comm = intra / topology.intra_host_bw + inter / topology.inter_host_bw
        cost = ShardCost(
            compute=compute,
            read_bytes=read,
            allreduce_intra=intra,
            allreduce_inter=inter,
            alone=compute + comm,
            collectives=collectives,
        )
    elif traffic is Traffic.HOST_ROW_SPLIT:
        # Partial sums are reduce-scattered inside the host (and the gradients all-gathered back),
        # then each pooled row crosses once: per peer, 1/L of a row each way on average.
        local = topology.ranks_per_host
        row = e * out_per_rank / local
        owner_intra = 2 * (local - 1) / local * e * out_elems
        to_owner = INDEX_BYTES * ids_per_rank + row
        extra = 0.0
        if topology.reduce_scatter_bw is not None:
            # The host's reduce-scatter and all-gather: at their own bandwidth, not the links'.
            extra = max(
                owner_intra * (1 / topology.reduce_scatter_bw - 1 / topology.intra_host_bw), 0.0
            )
        cost = ShardCost(
            compute=compute,
            read_bytes=read,
            to_owner=to_owner,
            from_owner=row,
            owner_intra=owner_intra,
            collective_extra=extra,
            sender_compute=sender,
            collectives=collectives,
            alone=compute
            + to_owner * owner_seconds_per_byte(topology)
            + owner_intra / topology.intra_host_bw
            + extra,
        )
    else:
        to_owner = INDEX_BYTES * ids_per_rank + e * out_per_rank
        from_owner = e * out_per_rank
        extra = 0.0
        if traffic is Traffic.ROW_SPLIT and topology.reduce_scatter_bw is not None:
            # The partial sums go by reduce-scatter, and their gradients come back by all-gather
            # (the e·out_per_rank of to_owner): both at their own bandwidth, not the links'.
            extra = max(
                2
                * from_owner
                * ((w - 1) / topology.reduce_scatter_bw - owner_seconds_per_byte(topology)),
                0.0,
            )
        cost = ShardCost(
            compute=compute,
            read_bytes=read,
            to_owner=to_owner,
            from_owner=from_owner,
            collective_extra=extra,
            sender_compute=sender,
            collectives=collectives,
            alone=compute + to_owner * owner_seconds_per_byte(topology) + extra,
        )
    return ShardEstimate(weights, state, io, fwd_compute, bwd_compute, cost)
