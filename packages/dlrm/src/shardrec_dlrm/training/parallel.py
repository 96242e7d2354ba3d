"""Who this process is in the run: core's description of the process group
(:class:`~shardrec.distributed.ShardingEnv`: rank, world size, the group) and of its nodes
(:class:`~shardrec.distributed.node_groups.NodeLayout`: ranks per node, from torchrun's
``LOCAL_WORLD_SIZE``), plus what only the trainer needs: its device and whether it owns the
group."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist

# The in-memory store of a one-process group; torch.distributed re-exports it without declaring it.
from torch._C._distributed_c10d import HashStore

from shardrec.distributed import ShardingEnv
from shardrec.distributed.node_groups import NodeLayout
from shardrec_dlrm.errors import UserError
from shardrec_dlrm.training.config import DeviceName

T = TypeVar("T")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelState:
    """One per process. ``env`` and ``nodes`` are core's types, handed as they are to
    DistributedModelParallel and the planner; ``local_rank`` picks this process's GPU;
    ``owns_group``: this object created the default process group (and ends it)."""

    env: ShardingEnv
    nodes: NodeLayout
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @classmethod
    def local(
        cls, rank: int, world_size: int, *, local_world_size: int | None = None
    ) -> ParallelState:
        """A state without a process group: what rank ``rank`` of ``world_size`` CPU processes
        would be (for planning and for reading a rank's data without running the job)."""
        return cls(
            env=ShardingEnv.from_local(world_size, rank),
            nodes=NodeLayout.from_env(world_size, local_world_size),
            local_rank=rank,
            device=torch.device("cpu"),
            owns_group=False,
        )

    @classmethod
    def init(cls, device: DeviceName = "auto", *, timeout_s: float = 600.0) -> ParallelState:
        """Joins the run torchrun (or ``--nproc``) set up through the environment, or starts a run
        of one.

        A run of one still gets a (gloo or NCCL) process group of size 1, so that the sharded model
        and the metrics take one code path whatever the world size. Raises ``ValueError`` for a
        device that is not there and for ranks per node that do not divide the world.
        """
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        launched = all(name in os.environ for name in _TORCHRUN_VARS)
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
        if use_cuda and local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                "visible): run at most one process per GPU, or --device cpu"
            )
        target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(target)
        owns_group = not dist.is_initialized()
        if owns_group:
            backend = "nccl" if use_cuda else "gloo"
            timeout = timedelta(seconds=timeout_s)
            if launched:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(
                    backend, store=HashStore(), rank=0, world_size=1, timeout=timeout
                )
        env = ShardingEnv.from_process_group()
        try:
            nodes = NodeLayout.from_env(env.world_size)
        except ValueError:
            if owns_group:
                dist.destroy_process_group()
            raise
        return cls(
            env=env,
            nodes=nodes,
            local_rank=local_rank,
            device=target,
            owns_group=owns_group,
        )

    def decide_on_main(self, decide: Callable[[], T]) -> T:
        """Runs ``decide`` on rank 0 alone (file-system decisions: one process looks, so all agree)
        and returns its result on every rank; a :class:`UserError` (or ``OSError``) it raises is
        raised on every rank, so that no rank waits for the others at the next collective."""
        outcome: list[tuple[bool, object] | None] = [None]
        if self.is_main:
            try:
                outcome[0] = (True, decide())
            except UserError as error:
                outcome[0] = (False, str(error))
            except OSError as error:
                outcome[0] = (False, f"{error.filename or 'file system'}: {error.strerror}")
        if self.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)
        received = outcome[0]
        assert received is not None
        done, value = received
        if not done:
            raise UserError(str(value))
        return cast(T, value)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
