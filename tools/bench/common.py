"""Timing helpers shared by the benchmarks in tools/bench/.

- ``measure(fn, warmup, iters)``: median seconds per call of ``fn``.
- ``compare(factories, warmup, iters, rounds)``: several contenders measured in alternating rounds
  (the machine is shared: alternating puts every contender through the same bursts of load), best
  round of each.
- ``peer_available()`` / ``run_peer(args)`` / ``run_peer_snippet(code)``: run a script or a snippet
  in ``.venv-peer`` (TorchRec 1.8.0 beside shardrec, see ``make bench-peer``) under the shared
  allocator settings.
- ``free_port()``: a free loopback port for a process group; ``keep_best(...)``: fold one round's
  result into the best so far.
"""

from __future__ import annotations

import gc
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[2]
PEER_PYTHON: Final = REPO / ".venv-peer" / "bin" / "python"
# The allocator setting both sides of every comparison run under (see docs/benchmarks.md).
MALLOC_ENV: Final = {"MALLOC_MMAP_THRESHOLD_": "33554432"}


Clock = Callable[[], float]


def measure(
    fn: Callable[[], object],
    warmup: int = 10,
    iters: int = 100,
    clock: Clock = time.perf_counter,
) -> float:
    """Median time of one call of ``fn``, in seconds, after ``warmup`` untimed calls.

    ``clock`` defaults to wall time. ``time.thread_time`` (CPU time of the calling thread, user and
    system, page faults included) suits single-threaded work on a loaded machine: time spent waiting
    for a core while other processes run is not counted.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one timed call would only add noise
    try:
        for _ in range(iters):
            start = clock()
            fn()
            times.append(clock() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times)


def compare(
    factories: Mapping[str, Callable[[], Callable[[], object]]],
    warmup: int = 10,
    iters: int = 100,
    rounds: int = 3,
    clock: Clock = time.perf_counter,
) -> dict[str, float]:
    """Best-of-``rounds`` median seconds per call for each contender.

    Each round asks every factory for a fresh callable (so per-round state, such as a pool of
    fresh inputs, is rebuilt) and measures the contenders one after the other, reversing the
    order every other round.
    """
    best = {name: float("inf") for name in factories}
    names = list(factories)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            best[name] = min(best[name], measure(factories[name](), warmup, iters, clock))
    return best


def peer_available() -> bool:
    """True when ``.venv-peer`` exists and imports torchrec."""
    if not PEER_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(PEER_PYTHON), "-c", "import torchrec"],
        capture_output=True,
        check=False,
        env={**os.environ, **MALLOC_ENV},
    )
    return probe.returncode == 0


def run_peer(args: Sequence[str], timeout: float = 1800.0) -> str:
    """Run ``.venv-peer/bin/python *args`` under the shared allocator settings; return stdout."""
    done = subprocess.run(
        [str(PEER_PYTHON), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **MALLOC_ENV},
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peer run {list(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def run_peer_snippet(code: str, timeout: float = 1800.0) -> str | None:
    """Run Python ``code`` in ``.venv-peer`` and return its stdout; None when there is no peer."""
    if not peer_available():
        return None
    return run_peer(["-c", code], timeout=timeout)


def free_port() -> int:
    """A loopback port free at the time of the call (for ``MASTER_PORT`` / ``tcp://``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def keep_best(
    best: dict[Any, dict[str, Any]],
    key: Any,
    result: dict[str, Any],
    higher: Sequence[str],
    lower: Sequence[str] = (),
) -> None:
    """Folds ``result`` into ``best[key]``: the largest of each ``higher`` metric, the smallest of
    each ``lower`` one. A result with an ``"error"`` is kept only while nothing better is there."""
    if "error" in result:
        best.setdefault(key, result)
        return
    old = best.get(key)
    if old is None or "error" in old:
        best[key] = dict(result)
        return
    for metric in higher:
        old[metric] = max(old[metric], result[metric])
    for metric in lower:
        old[metric] = min(old[metric], result[metric])
