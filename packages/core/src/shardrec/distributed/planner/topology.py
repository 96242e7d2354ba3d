"""The hardware a plan is made for: how many ranks, how much memory each has, how fast it moves
bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

GB: Final = 1024**3

# Defaults for a current datacenter GPU host; every figure can be overridden per Topology.
DEFAULT_HBM_CAP: Final = 32 * GB
DEFAULT_DDR_CAP: Final = 128 * GB
DEFAULT_HBM_BW: Final = 897e9  # bytes/s, device memory
DEFAULT_DDR_BW: Final = 51e9  # bytes/s, host memory
DEFAULT_INTRA_HOST_BW: Final = 600e9  # bytes/s per rank, NVLink-class
DEFAULT_INTER_HOST_BW: Final = 12.5e9  # bytes/s per rank, 100 Gb/s NIC
DEFAULT_BWD_COMPUTE_MULTIPLIER: Final = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Ranks of one kind: ``world_size`` ranks, ``local_world_size`` per host.

    ``hbm_cap`` and ``ddr_cap`` are bytes per rank. On ``compute_device="cpu"`` tables live in DDR
    and
    ``hbm_cap`` is 0; on any accelerator they live in HBM. Bandwidths are bytes per second per rank.
    ``step_overhead`` is seconds every step costs whatever its bytes, ids and collectives (Python
    dispatch, autograd), added to every rank's estimated step; ``tools/bench/planner_calibrate.py``
    measures it. It moves every plan's step alike, so it changes no choice, only the estimate
    reported. ``reduce_scatter_bw``: bytes per second a rank sends in a reduce-scatter (row-wise's
    and table-row-wise's partial sums) and in the all-gather that brings their gradients back,
    where the backend's are slower per byte than the links (gloo on CPU); None prices them at the
    links' bandwidth.

    Costs that no byte count explains, all 0 by default (a GPU's are small beside its step;
    ``tools/bench/planner_calibrate.py`` measures them for gloo on CPU): ``collective_latency``,
    seconds of one collective whatever its size, counted once per collective a sharded module
    issues per step; ``route_cost_per_id``, seconds a rank spends per id it sends a row split
    (finding the owner block, sorting by owner: row-wise, table-row-wise, grid);
    ``receive_cost_per_id``, seconds an owner spends per id it receives (laying the senders' ids
    out for one lookup), and ``backward_cost_per_id``, seconds the lookup's backward spends per
    id (sorting them, updating row by row), both on top of the lookup's bytes.

    Costs of a step's pooled output beyond its bytes at the links' or the memory's bandwidth, also
    0 by default: ``output_cost_per_row``, seconds an owner spends per pooled row it produces for
    a sender (one bag of one key: its offsets, the row written and its gradient row read back,
    forward and backward together); ``output_copy_cost_per_byte``, seconds a rank spends per byte
    of the pooled output it receives from an owner and copies into its module's output (the
    owners' blocks put in column order, and the gradient taken apart again in the backward).
    """

    world_size: int
    compute_device: str = "cuda"
    local_world_size: int | None = None
    hbm_cap: int | None = None
    ddr_cap: int = DEFAULT_DDR_CAP
    hbm_mem_bw: float = DEFAULT_HBM_BW
    ddr_mem_bw: float = DEFAULT_DDR_BW
    intra_host_bw: float = DEFAULT_INTRA_HOST_BW
    inter_host_bw: float = DEFAULT_INTER_HOST_BW
    bwd_compute_multiplier: float = DEFAULT_BWD_COMPUTE_MULTIPLIER
    step_overhead: float = 0.0
    reduce_scatter_bw: float | None = None
    collective_latency: float = 0.0
    route_cost_per_id: float = 0.0
    receive_cost_per_id: float = 0.0
    backward_cost_per_id: float = 0.0
    output_cost_per_row: float = 0.0
    output_copy_cost_per_byte: float = 0.0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"Topology.world_size must be >= 1, got {self.world_size}")
        if self.compute_device == "meta":
            raise ValueError(
                "Topology.compute_device is where the model will run ('cpu', 'cuda'), not 'meta'"
            )
        local = self.local_world_size if self.local_world_size is not None else self.world_size
        if local < 1 or self.world_size % local != 0:
            raise ValueError(
                f"Topology.local_world_size={local} must be >= 1 and divide "
                f"world_size={self.world_size}"
            )
        for name in ("ddr_cap", "hbm_mem_bw", "ddr_mem_bw", "intra_host_bw", "inter_host_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Topology.{name} must be > 0, got {getattr(self, name)}")
        if self.reduce_scatter_bw is not None and self.reduce_scatter_bw <= 0:
            raise ValueError(
                f"Topology.reduce_scatter_bw must be > 0, got {self.reduce_scatter_bw}"
            )
        for name in (
            "step_overhead",
            "collective_latency",
            "route_cost_per_id",
            "receive_cost_per_id",
            "backward_cost_per_id",
            "output_cost_per_row",
            "output_copy_cost_per_byte",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"Topology.{name} must be >= 0, got {getattr(self, name)}")
        if self.hbm_cap is not None and self.hbm_cap < 0:
            raise ValueError(f"Topology.hbm_cap must be >= 0, got {self.hbm_cap}")

    @property
    def ranks_per_host(self) -> int:
        return self.local_world_size if self.local_world_size is not None else self.world_size

    @property
    def uses_hbm(self) -> bool:
        """Whether tables live in device memory (any accelerator) rather than host memory."""
        return self.compute_device != "cpu"

    @property
    def hbm_per_rank(self) -> int:
        if not self.uses_hbm:
            return 0
        return self.hbm_cap if self.hbm_cap is not None else DEFAULT_HBM_CAP

    @property
    def memory_bw(self) -> float:
        """Bandwidth of the memory that holds the tables."""
        return self.hbm_mem_bw if self.uses_hbm else self.ddr_mem_bw

    @property
    def comm_bw(self) -> float:
        """Per-rank bandwidth of an all-to-all that spans every rank: the slowest link it
        crosses."""
        return self.inter_host_bw if self.world_size > self.ranks_per_host else self.intra_host_bw


def local_world_size_from_env(world_size: int) -> int | None:
    """Ranks per host as the launcher says (torchrun's ``LOCAL_WORLD_SIZE``, which the two-level
    sharders read too), or None (one host) when it is unset or does not divide ``world_size``."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "")
    if raw.isdigit() and int(raw) > 0 and world_size % int(raw) == 0:
        return int(raw)
    return None
