"""A pool of long-lived gloo workers that runs many test cases, so each case costs no process start.

``dist_pool.run(world_size, fn, **kwargs)`` runs ``fn(env, **kwargs)`` on ranks ``0..world_size-1``
of a 4-process gloo pool (a sub-group of that size; the other ranks idle) and returns the list of
per-rank results. ``fn`` must be a module-level function of a test file: each worker loads that file
by path, as a module of a package over its folder, so the file may import the helpers beside it
(``from ._reference import ...``). A failure on any rank raises here with that rank's traceback;
the pool is then rebuilt, so a hung collective cannot poison later tests. Workers are plain
subprocesses (``_pool_worker.py``) that talk to the test process over a local authenticated
connection.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

import pytest

POOL_SIZE = 4
CASE_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0
_WORKER = Path(__file__).resolve().parent / "_pool_worker.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DistPool:
    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []

    def _start(self) -> None:
        key = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=key, backlog=POOL_SIZE * 2) as listener:
            parent_port = listener.address[1]
            port = _free_port()
            tail = [str(parent_port), key.hex()]
            self._procs = [
                subprocess.Popen(
                    [sys.executable, str(_WORKER), str(r), str(POOL_SIZE), str(port), *tail],
                    env=dict(os.environ),
                )
                for r in range(POOL_SIZE)
            ]
            accepted = [listener.accept() for _ in range(POOL_SIZE)]
        by_rank: dict[int, Connection] = {}
        for conn in accepted:
            self._await([conn], START_TIMEOUT_S)
            _, rank = pickle.loads(conn.recv_bytes())
            by_rank[rank] = conn
        self._conns = [by_rank[r] for r in range(POOL_SIZE)]

    def _await(self, conns: list[Connection], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            ready = wait(conns, timeout=1.0)
            if ready:
                return ready
            dead = [p.args for p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"test pool worker exited: {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"test pool: no answer in {timeout}s")

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.send_bytes(pickle.dumps(None))
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
        for p in self._procs:
            p.kill()
            p.wait()
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []

    def run(self, world_size: int, fn: Callable[..., Any], **kwargs: Any) -> list[Any]:
        if not 1 <= world_size <= POOL_SIZE:
            raise ValueError(f"world_size must be in 1..{POOL_SIZE}")
        if not self._procs or any(p.poll() is not None for p in self._procs):
            self.close()
            self._start()
        path = str(Path(inspect.getsourcefile(fn) or "").resolve())
        conns = self._conns[:world_size]
        for c in conns:
            c.send_bytes(pickle.dumps((path, fn.__name__, world_size, kwargs)))
        out: dict[int, Any] = {}
        errors: list[str] = []
        pending = list(conns)
        try:
            while pending:
                for c in self._await(pending, CASE_TIMEOUT_S):
                    rank, ok, value = pickle.loads(c.recv_bytes())
                    pending.remove(c)
                    if ok:
                        out[rank] = value
                    else:
                        errors.append(f"--- rank {rank} ---\n{value}")
                if errors:
                    break
        except (TimeoutError, RuntimeError, EOFError):
            self.kill()
            raise
        if errors:
            # Ranks that did not fail may be stuck in a collective: start afresh.
            self.kill()
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(world_size)]


@pytest.fixture(scope="session")
def dist_pool() -> Iterator[DistPool]:
    pool = DistPool()
    yield pool
    pool.close()
