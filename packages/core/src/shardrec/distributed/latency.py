"""A latency simulator: a process group whose every collective completes a fixed time later.

On one machine every collective is fast, so a training step cannot show whether its communication
would hide behind computation on a real network. A delayed group wraps gloo: each collective is
issued to gloo at once, and its ``Work`` completes ``latency_s`` after gloo's does, on a timer
thread, so the caller's thread stays free::

    group = new_delayed_group(latency_s=0.005)    # collective: every rank of the default group
    model = DistributedModelParallel(module, env=ShardingEnv.from_process_group(group))
    group.latency_s = 0.020                       # change it between measurements

A blocking step (issue, wait, issue, wait ...) pays the latency once per collective; a pipelined
step that computes while a collective is in flight pays less. The group's backend name is
``shardrec_delayed``, not ``gloo``, so collectives that pick a native gloo path by the backend
name (``comm.reduce_scatter_rows``) take their portable path under it.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Final

import torch
import torch.distributed as dist

# Work from a Future: torch's documented way for a process group written in Python to return
# Work; torch.distributed re-exports neither it nor ProcessGroupGloo's constructor types.
from torch._C._distributed_c10d import (  # type: ignore[attr-defined]
    _create_work_from_future,
)

from shardrec.distributed.group_ref import GroupDestroyedError

__all__ = ["DELAYED_BACKEND", "DelayedProcessGroup", "new_delayed_group"]

DELAYED_BACKEND: Final = "shardrec_delayed"


class DelayedProcessGroup(dist.ProcessGroup):
    """A gloo group whose collectives each complete ``latency_s`` seconds after gloo's.

    ``issued`` counts the collectives issued so far (a benchmark divides the latency a step shows
    by the latency its collectives were given).
    """

    def __init__(self, inner: dist.ProcessGroupGloo, rank: int, size: int) -> None:
        # torch's stubs list only the constructor that takes a store; a Python group has none.
        super().__init__(rank, size)  # type: ignore[call-arg]
        # Any: torch's stubs give gloo's backend none of the collectives it has.
        self._inner: Any = inner
        self.latency_s = 0.0
        self.issued = 0
        self._timers: list[threading.Thread] = []

    def _gloo(self) -> Any:
        if self._inner is None:
            raise GroupDestroyedError(
                "DelayedProcessGroup: it has been destroyed (torch.distributed"
                ".destroy_process_group), so it can run no collective"
            )
        return self._inner

    def shutdown(self) -> None:
        """``destroy_process_group`` calls it: waits for the collectives still being delayed, then
        lets go of the gloo group, so that it ends now, its threads joined, whoever still holds
        this one (``shardrec.distributed.group_ref`` says why that matters)."""
        for timer in self._timers:
            timer.join()
        self._timers = []
        self._inner = None

    def _delayed(self, work: dist.Work) -> dist.Work:
        self.issued += 1
        latency = self.latency_s
        if latency <= 0:
            return work
        done: torch.futures.Future[Any] = torch.futures.Future()
        inner_future = work.get_future()

        def finish() -> None:
            try:
                value = inner_future.wait()
                time.sleep(latency)
                done.set_result(value)
            except Exception as exc:  # handed to whoever waits on the work
                done.set_exception(exc)

        timer = threading.Thread(target=finish, daemon=True)
        timer.start()
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        out: dist.Work = _create_work_from_future(done)
        return out

    # Every collective shardrec, DDP and torch.distributed.checkpoint issue goes to gloo here.
    def allreduce(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().allreduce(*args))

    def allreduce_coalesced(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().allreduce_coalesced(*args))

    def allgather(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().allgather(*args))

    def _allgather_base(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo()._allgather_base(*args))

    def allgather_into_tensor_coalesced(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().allgather_into_tensor_coalesced(*args))

    def reduce_scatter(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().reduce_scatter(*args))

    def _reduce_scatter_base(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo()._reduce_scatter_base(*args))

    def reduce_scatter_tensor_coalesced(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().reduce_scatter_tensor_coalesced(*args))

    def alltoall_base(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().alltoall_base(*args))

    def alltoall(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().alltoall(*args))

    def broadcast(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().broadcast(*args))

    def reduce(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().reduce(*args))

    def gather(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().gather(*args))

    def scatter(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().scatter(*args))

    def barrier(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().barrier(*args))

    def send(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().send(*args))

    def recv(self, *args: Any) -> dist.Work:
        return self._delayed(self._gloo().recv(*args))

    def getBackendName(self) -> str:  # torch asks a Python group for it by this name
        return DELAYED_BACKEND


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> DelayedProcessGroup:
    # ``store``: the group's PrefixStore (torch's stubs do not export the Store type).
    inner = dist.ProcessGroupGloo(store, rank, size, timeout)
    return DelayedProcessGroup(inner, rank, size)


def new_delayed_group(
    latency_s: float, ranks: list[int] | None = None, timeout: timedelta | None = None
) -> DelayedProcessGroup | None:
    """A new group over ``ranks`` (default: all) of the default group, on CPU tensors, whose
    collectives complete ``latency_s`` seconds later than gloo's; None on a rank outside
    ``ranks``. Collective: every rank of the default group calls it, as
    ``torch.distributed.new_group``."""
    if latency_s < 0:
        raise ValueError(f"new_delayed_group: latency_s must be >= 0, got {latency_s}")
    if not hasattr(dist.Backend, DELAYED_BACKEND.upper()):
        dist.Backend.register_backend(DELAYED_BACKEND, _create, devices=["cpu"])
    group = dist.new_group(ranks, timeout=timeout, backend=DELAYED_BACKEND)
    if not isinstance(group, DelayedProcessGroup):
        return None
    group.latency_s = latency_s
    return group
