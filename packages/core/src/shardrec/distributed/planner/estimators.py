"""Storage and time estimates of one shard. Simple, documented formulas that a reader can check by
hand.

Notation (per step): B samples per rank, W ranks, F features reading the table, P ids per sample per
feature (pooling factor), e bytes per weight element, ``cols`` the shard's columns, ``rows`` its
rows.

- ids routed to a shard: ALL_IDS: B·W·F·P; ROW_SPLIT: B·W·F·P · rows/num_embeddings; REPLICATED:
  B·F·P.
- output elements of a shard: pooled ALL_IDS: B·W·F·cols; ROW_SPLIT: B·W·F·dim (partial sums);
  REPLICATED: B·F·cols; sequence (unpooled) tables: ids · cols.
- storage = weights (rows·cols·e) + optimizer state (see OPTIMIZER_STATE) + input ids (8 bytes each)
  + output and its gradient (2 · output elements · e); REPLICATED adds a dense gradient
  (rows·cols·e).
- forward compute = (ids · cols + output elements) · e / memory bandwidth; backward = forward × the
  topology's ``bwd_compute_multiplier``.
- forward comms (none on one rank) = (8 · ids + e · output elements) / comm bandwidth, backward
  comms = e · output elements / comm bandwidth; REPLICATED has no forward comms and an all-reduce of
  its gradient backward, 2·(W-1)/W · rows·cols·e / comm bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shardrec.distributed.planner.layouts import Traffic
from shardrec.distributed.planner.topology import Topology
from shardrec.distributed.planner.types import TableSpec

INDEX_BYTES: Final = 8

# Optimizer state as (bytes per row, bytes per element), fp32 states.
OPTIMIZER_STATE: Final[dict[str, tuple[int, int]]] = {
    "none": (0, 0),
    "sgd": (0, 0),
    "exact_sgd": (0, 0),
    "rowwise_adagrad": (4, 0),
    "exact_rowwise_adagrad": (4, 0),
    "adagrad": (0, 4),
    "exact_adagrad": (0, 4),
    "lars_sgd": (0, 4),
    "adam": (0, 8),
    "lamb": (0, 8),
    "partial_rowwise_adam": (4, 4),
    "partial_rowwise_lamb": (4, 4),
}


def optimizer_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    try:
        per_row, per_element = OPTIMIZER_STATE[optimizer]
    except KeyError:
        known = ", ".join(sorted(OPTIMIZER_STATE))
        raise ValueError(
            f"unknown optimizer {optimizer!r} for the planner's estimates; known: {known}"
        ) from None
    return per_row * rows + per_element * rows * cols


@dataclass(frozen=True, slots=True)
class Workload:
    """The per-table facts the estimates need, resolved from the planner defaults and
    constraints."""

    batch_size: int
    pooling_factor: float
    optimizer: str


@dataclass(frozen=True, slots=True)
class ShardEstimate:
    weights: int
    optimizer_state: int
    io: int
    fwd_compute: float
    fwd_comms: float
    bwd_compute: float
    bwd_comms: float

    @property
    def storage(self) -> int:
        return self.weights + self.optimizer_state + self.io

    @property
    def perf(self) -> float:
        return self.fwd_compute + self.fwd_comms + self.bwd_compute + self.bwd_comms


def estimate_shard(
    table: TableSpec,
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
    if traffic is Traffic.ALL_IDS:
        ids = b * w * f * p
    elif traffic is Traffic.ROW_SPLIT:
        ids = b * w * f * p * rows / table.num_embeddings if table.num_embeddings else 0.0
    else:
        ids = b * f * p
    if not table.pooled:
        out_elems = ids * cols
    elif traffic is Traffic.ALL_IDS:
        out_elems = b * w * f * cols
    elif traffic is Traffic.ROW_SPLIT:
        out_elems = b * w * f * table.embedding_dim
    else:
        out_elems = b * f * cols

    weights = rows * cols * e
    state = optimizer_state_bytes(workload.optimizer, rows, cols)
    io = round(ids * INDEX_BYTES + 2 * out_elems * e)
    fwd_compute = (ids * cols + out_elems) * e / topology.memory_bw
    bwd_compute = fwd_compute * topology.bwd_compute_multiplier
    if traffic is Traffic.REPLICATED:
        io += weights  # the dense gradient
        fwd_comms = 0.0
        bwd_comms = 2 * (w - 1) / w * weights / topology.comm_bw
    elif w == 1:
        fwd_comms = bwd_comms = 0.0
    else:
        fwd_comms = (INDEX_BYTES * ids + e * out_elems) / topology.comm_bw
        bwd_comms = e * out_elems / topology.comm_bw
    return ShardEstimate(weights, state, io, fwd_compute, fwd_comms, bwd_compute, bwd_comms)
