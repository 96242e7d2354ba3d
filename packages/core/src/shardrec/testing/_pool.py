"""A pool of gloo worker processes that runs case functions on several ranks.

::

    def case(env: ShardingEnv, scale: float) -> torch.Tensor:   # module level: sent by name
        return comm_result_of(env.rank) * scale

    with WorkerPool(4) as pool:
        per_rank = pool.run(3, case, scale=2.0)                   # ranks 0, 1, 2 of the pool

The workers are started once (the first ``run``) and serve many cases, so a case costs no process
start. A case on ``w`` ranks runs ``fn(env, **kwargs)`` on ranks ``0..w-1`` of a process group of
its own (the other workers idle) and returns the per-rank results in rank order. A case that raises
on any rank raises :class:`RankFailedError` here with each failed rank's traceback; a worker that
dies raises it with the exit status; a case that gives no answer within ``timeout_s`` raises
:class:`RankTimeoutError` naming the silent ranks. After a failure the workers are killed (ranks
that did not fail may wait in a collective forever) and the next ``run`` starts fresh ones.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from shardrec.testing._errors import RankFailedError, RankTimeoutError
from shardrec.testing._transport import PRELOAD_ENV, dumps_task

__all__ = ["WorkerPool", "run_ranks"]

DEFAULT_TIMEOUT_S: Final = 120.0
START_TIMEOUT_S: Final = 180.0
_POLL_S: Final = 0.2
# After one rank fails, how long the others may take to report their own failures (often the same
# error on every rank) before the workers are killed.
_GRACE_S: Final = 2.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _case_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class WorkerPool:
    """``size`` long-lived gloo workers (ranks ``0..size-1``) on this machine's CPU.

    - ``timeout_s``: the longest a case may take before its silent ranks are reported as hung.
    - ``preload``: Python files every worker runs before it imports torch (an import hook the test
      suite installs in its own process, for example).
    - ``env``: environment variables the workers get on top of this process's (at their start).
    """

    def __init__(
        self,
        size: int,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        preload: Sequence[str | os.PathLike[str]] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"WorkerPool: size must be >= 1, got {size}")
        self.size = size
        self.timeout_s = timeout_s
        self.preload = [str(Path(p).resolve()) for p in preload]
        self.env = dict(env or {})
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []

    @property
    def started(self) -> bool:
        """Whether the workers are up (they start on the first :meth:`run`)."""
        return bool(self._procs)

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        key = secrets.token_bytes(16)
        env = {**os.environ, **self.env}
        env[PRELOAD_ENV] = os.pathsep.join(self.preload)
        with Listener(("127.0.0.1", 0), authkey=key, backlog=self.size * 2) as listener:
            tail = [str(_free_port()), str(listener.address[1]), key.hex()]
            self._procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "shardrec.testing._worker",
                        str(r),
                        str(self.size),
                        *tail,
                    ],
                    env=env,
                )
                for r in range(self.size)
            ]
            accepted = [listener.accept() for _ in range(self.size)]
        by_rank: dict[int, Connection] = {}
        deadline = time.monotonic() + START_TIMEOUT_S
        for conn in accepted:
            while not conn.poll(_POLL_S):
                self._check_alive("starting the workers", list(range(self.size)))
                if time.monotonic() > deadline:
                    self.kill()
                    raise RankTimeoutError("starting the workers", [], START_TIMEOUT_S)
            _, rank = pickle.loads(conn.recv_bytes())
            by_rank[rank] = conn
        self._conns = [by_rank[r] for r in range(self.size)]

    def _exit_status(self, rank: int) -> str:
        try:
            code = self._procs[rank].wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "worker closed its connection but is still running"
        return f"worker process exited with status {code}"

    def _check_alive(self, case: str, ranks: Sequence[int]) -> None:
        dead = {r: self._procs[r].poll() for r in ranks}
        failures = {
            r: f"worker process exited with status {c}" for r, c in dead.items() if c is not None
        }
        if failures:
            self.kill()
            raise RankFailedError(case, failures)

    def close(self) -> None:
        """Stop the workers (each leaves its process group cleanly); kill any that do not."""
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.send_bytes(b"")
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []

    def kill(self) -> None:
        """Kill the workers at once (after a failure: the others may be stuck in a collective)."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []

    # -- running cases ---------------------------------------------------------------------------
    def run(
        self,
        world_size: int,
        fn: Callable[..., Any],
        /,
        *,
        local_world_size: int | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """``fn(env, **kwargs)`` on ranks ``0..world_size-1``; their results in rank order.

        ``fn`` must be picklable by name (a module-level function); ``kwargs`` and the results
        are pickled. ``local_world_size`` sets ``LOCAL_WORLD_SIZE`` on the ranks for the case, as
        torchrun does, so that ``world_size / local_world_size`` simulated nodes are built.
        ``timeout_s`` overrides the pool's limit for this case.
        """
        if not 1 <= world_size <= self.size:
            raise ValueError(f"world_size must be in 1..{self.size}, got {world_size}")
        if local_world_size is not None and (local_world_size < 1 or world_size % local_world_size):
            raise ValueError(
                f"local_world_size={local_world_size} must be >= 1 and divide {world_size}"
            )
        case = _case_name(fn)
        files, payload = dumps_task((fn, kwargs))
        message = pickle.dumps((files, world_size, local_world_size, payload))
        if not self._procs or any(p.poll() is not None for p in self._procs):
            self.kill()
            self._start()
        for c in self._conns[:world_size]:
            c.send_bytes(message)
        return self._collect(case, world_size, timeout_s or self.timeout_s)

    def _collect(self, case: str, world_size: int, timeout_s: float) -> list[Any]:
        pending = {self._conns[r]: r for r in range(world_size)}
        out: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        grace_until = float("inf")
        while pending:
            if failures and time.monotonic() > grace_until:
                break
            for c in wait(list(pending), timeout=_POLL_S):
                assert isinstance(c, Connection)
                try:
                    rank, ok, value = pickle.loads(c.recv_bytes())
                except (EOFError, OSError):
                    rank, ok, value = pending[c], False, self._exit_status(pending[c])
                del pending[c]
                if ok:
                    out[rank] = value
                else:
                    failures[rank] = value
                    grace_until = min(grace_until, time.monotonic() + _GRACE_S)
            if failures:
                continue
            self._check_alive(case, sorted(pending.values()))
            if pending and time.monotonic() > deadline:
                self.kill()
                raise RankTimeoutError(case, sorted(pending.values()), timeout_s)
        if failures:
            # The ranks that did not fail may be stuck in a collective: start afresh next time.
            self.kill()
            raise RankFailedError(case, failures)
        return [out[r] for r in range(world_size)]


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    /,
    *,
    local_world_size: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> list[Any]:
    """Run one case on ``world_size`` fresh gloo processes and stop them (see :class:`WorkerPool`,
    which amortises the start over many cases)."""
    with WorkerPool(world_size, timeout_s=timeout_s) as pool:
        return pool.run(world_size, fn, local_world_size=local_world_size, **kwargs)
