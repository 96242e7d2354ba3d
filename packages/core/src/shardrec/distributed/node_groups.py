"""Ranks grouped by machine: the intra-node and cross-node process groups of two-level sharding.

torchrun numbers ranks node by node and tells every process how many ranks its node runs
(``LOCAL_WORLD_SIZE``). With ``L`` ranks per node, rank ``r`` of the sharding group is local rank
``r % L`` of node ``r // L``::

    world 4, LOCAL_WORLD_SIZE 2      intra-node groups: {0, 1} {2, 3}   (fast links)
      node 0: ranks 0 1              cross-node groups: {0, 2} {1, 3}   (same local rank,
      node 1: ranks 2 3                                                  one per node)

Two-level sharders reduce partial results over the intra-node group and send only finished ones
over the cross-node group, so the slow links carry each pooled embedding once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

import torch.distributed as dist

from shardrec.distributed.group_ref import GroupRef
from shardrec.distributed.types import ShardingEnv

__all__ = ["LOCAL_WORLD_SIZE_ENV", "NodeGroups", "NodeLayout", "node_groups"]

LOCAL_WORLD_SIZE_ENV: Final = "LOCAL_WORLD_SIZE"


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """``world_size`` ranks, ``local_world_size`` per node, numbered node by node."""

    world_size: int
    local_world_size: int

    def __post_init__(self) -> None:
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(
                f"{self.local_world_size} ranks per node ({LOCAL_WORLD_SIZE_ENV}) do not divide"
                f" the sharding group's {self.world_size} ranks into whole nodes"
            )

    @classmethod
    def from_env(cls, world_size: int, local_world_size: int | None = None) -> NodeLayout:
        """``local_world_size``, else the launcher's ``LOCAL_WORLD_SIZE``, else one node."""
        if local_world_size is None:
            raw = os.environ.get(LOCAL_WORLD_SIZE_ENV)
            if raw is None:
                return cls(world_size, world_size)
            if not raw.strip().isdigit():
                raise ValueError(f"{LOCAL_WORLD_SIZE_ENV}={raw!r} is not a whole number")
            local_world_size = int(raw)
        return cls(world_size, local_world_size)

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    def node_of(self, rank: int) -> int:
        return rank // self.local_world_size

    def local_rank_of(self, rank: int) -> int:
        return rank % self.local_world_size

    def ranks_of_node(self, node: int) -> range:
        start = node * self.local_world_size
        return range(start, start + self.local_world_size)


@dataclass(frozen=True, slots=True, init=False)
class NodeGroups:
    """This rank's two groups. ``intra`` is None on one-rank nodes and ``cross`` on one node:
    the collectives of ``shardrec.distributed.comm`` are the identity there. Held weakly, as
    ``ShardingEnv`` holds its group: after ``destroy_process_group`` they raise
    ``GroupDestroyedError``."""

    layout: NodeLayout
    rank: int
    _intra: GroupRef | None
    _cross: GroupRef | None

    def __init__(
        self,
        layout: NodeLayout,
        rank: int,
        intra: dist.ProcessGroup | None,
        cross: dist.ProcessGroup | None,
    ) -> None:
        owner = f"NodeGroups (rank {rank})"
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "_intra", None if intra is None else GroupRef.to(intra, owner))
        object.__setattr__(self, "_cross", None if cross is None else GroupRef.to(cross, owner))

    @property
    def intra(self) -> dist.ProcessGroup | None:
        return None if self._intra is None else self._intra()

    @property
    def cross(self) -> dist.ProcessGroup | None:
        return None if self._cross is None else self._cross()

    @property
    def node(self) -> int:
        return self.layout.node_of(self.rank)

    @property
    def local_rank(self) -> int:
        return self.layout.local_rank_of(self.rank)


# Groups are made by every rank of the default group together (torch requires it), once per
# process and layout: a second set would only hold more sockets open. Held weakly (torch owns
# them until destroy_process_group, which must be able to end them), with the default group
# they were made under.
_CACHE: dict[tuple[tuple[int, ...], int, str], tuple[GroupRef, GroupRef]] = {}
_CACHE_WORLD: list[GroupRef] = []


def _subgroup(sets: list[list[int]], backend: str) -> dist.ProcessGroup:
    group, _ = dist.new_subgroups_by_enumeration(sets, backend=backend)  # type: ignore[no-untyped-call]
    assert isinstance(group, dist.ProcessGroup)
    return group


def node_groups(env: ShardingEnv, local_world_size: int | None = None) -> NodeGroups:
    """The intra- and cross-node groups of ``env``'s rank (``local_world_size`` as in
    :meth:`NodeLayout.from_env`).

    With one node, or one rank per node, ``env.pg`` itself is the one group needed. Otherwise this
    is collective: every rank of the default process group calls it, and ``env.pg`` must hold
    them all (torch makes a group with every rank of the default group taking part); groups are
    made once per process and layout, then reused. Without a process group both are None.
    """
    layout = NodeLayout.from_env(env.world_size, local_world_size)
    if env.pg is None:
        return NodeGroups(layout, env.rank, None, None)
    local, nodes = layout.local_world_size, layout.nodes
    if nodes == 1 or local == 1:
        # One level only: the sharding group itself is the intra- or the cross-node group.
        intra = env.pg if nodes == 1 and local > 1 else None
        cross = env.pg if local == 1 and nodes > 1 else None
        return NodeGroups(layout, env.rank, intra, cross)
    members = dist.get_process_group_ranks(env.pg)
    if members != list(range(dist.get_world_size())):
        raise ValueError(
            f"two-level sharding over {nodes} nodes needs the sharding group to be every rank of"
            f" the default process group in order; its global ranks are {members} of"
            f" {dist.get_world_size()}"
        )
    world = dist.group.WORLD
    assert world is not None
    if not _CACHE_WORLD or not _CACHE_WORLD[0].alive or _CACHE_WORLD[0]() is not world:
        _CACHE.clear()
        _CACHE_WORLD[:] = [GroupRef.to(world, "node_groups")]
    # The node groups run on the sharding group's backend (a latency simulator's too).
    backend = str(dist.get_backend(env.pg))
    key = (tuple(members), local, backend)
    cached = _CACHE.get(key)
    if cached is not None and cached[0].alive and cached[1].alive:
        return NodeGroups(layout, env.rank, cached[0](), cached[1]())
    intra = _subgroup([list(layout.ranks_of_node(n)) for n in range(nodes)], backend)
    cross = _subgroup([[n * local + i for n in range(nodes)] for i in range(local)], backend)
    _CACHE[key] = (GroupRef.to(intra, "node_groups"), GroupRef.to(cross, "node_groups"))
    return NodeGroups(layout, env.rank, intra, cross)
