"""Who this process is in the run: rank, world size, device and the process group it owns."""

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

from shardrec_dlrm.errors import UserError
from shardrec_dlrm.training.config import DeviceName

T = TypeVar("T")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelState:
    """One per process. ``owns_group``: this object created the default process group (and ends
    it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, device: DeviceName = "auto", *, timeout_s: float = 600.0) -> ParallelState:
        """Joins the run torchrun (or ``--nproc``) set up through the environment, or starts a run
        of one.

        A run of one still gets a (gloo or NCCL) process group of size 1, so that the sharded model
        and the metrics take one code path whatever the world size.
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
        backend = "nccl" if use_cuda else "gloo"
        if dist.is_initialized():
            return cls(
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                local_rank=local_rank,
                device=target,
                backend=str(dist.get_backend()),
                owns_group=False,
            )
        timeout = timedelta(seconds=timeout_s)
        if launched:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=HashStore(), rank=0, world_size=1, timeout=timeout
            )
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            device=target,
            backend=backend,
            owns_group=True,
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

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
