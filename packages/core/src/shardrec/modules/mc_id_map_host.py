""":class:`~shardrec.modules.mc_id_map.IdRowMap`'s lookup and insert on CPU, compiled with numba.

The same algorithms as the map's torch code (the same slots, rows and displacement bound come
out; the tests run both on the same streams), written as loops over ids and compiled on first
use, on numpy views of the map's buffers: no copies, the buffers stay the state. A vectorised
lookup costs a dozen passes over the batch and a temporary per pass; a loop hashes an id, walks
its probe run and writes its row in one go, and a training step's read records (the step and read
count of every row found, the positions of the ids not found) are written in the same pass.
What that bought inside a training step: ``tools/bench/managed_ids.py`` and "Managed ids" in
docs/benchmarks.md (the step's lookups are timed on their own with ``--breakdown``).

numba is a dependency of shardrec; where it cannot be imported (an install without
dependencies), :func:`host_kernels` returns None and the map runs its torch code, which gives the
same results more slowly. Kernels compile once per process (``cache=True`` keeps the machine code
on disk beside this file, or in numba's user cache where that is not writable).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import numpy as np
import numpy.typing as npt

from shardrec.kernels.jit_intrinsics import prefetch_read, register_intrinsics

__all__ = ["DELETED", "EMPTY", "INSERT_WINDOW", "MULTIPLIER", "HostKernels", "host_kernels"]

Int64s = npt.NDArray[np.int64]

# The map's layout and hash, which the torch code (shardrec.modules.mc_id_map) shares.
EMPTY: Final = -1  # the row of an empty slot; "absent" in a lookup's answer
DELETED: Final = -2  # the row of a removed id's slot (a tombstone)
# Slots an insert round reads per id.
INSERT_WINDOW: Final = 16
# Fibonacci hashing: the top bits of ``id * odd constant`` (2^64 / golden ratio, as an int64).
MULTIPLIER: Final = -7046029254386353131
# Ids ahead whose home slot a lookup prefetches (of 0, 32, 64 and 128 tried on 8 maps out of
# cache, 64 and 128 took the least time).
_PREFETCH_IDS: Final = 64
# The multiplier as an unsigned 64-bit number, as the kernels multiply.
_UNSIGNED_MULTIPLIER: Final = MULTIPLIER & 0xFFFF_FFFF_FFFF_FFFF


def _find(
    slots: Int64s,
    bits: int,
    reach: int,
    ids: Int64s,
    out: Int64s,
    hit_rows: Int64s,
    miss_at: Int64s,
    last_read: Int64s,
    step: int,
    reads: Int64s,
    record: int,
) -> tuple[int, int]:
    """``out[i]``: the row of ``ids[i]``, -1 where absent. ``record`` 0: nothing more
    (``hit_rows`` is scratch, the other arrays are not touched); 1: a training step's read
    records: the rows found appended to ``hit_rows`` in batch order, the positions of the ids not
    found to ``miss_at``, ``last_read[row] = step`` for every row found; 2: also one more read
    in ``reads[row]`` per id found. Returns (rows found, ids not found); (0, 0) for 0.

    Three passes: the home slot of every id first, a loop with no branch that also prefetches the
    home slot of the id ``_PREFETCH_IDS`` places ahead, so the processor has many of these cache
    misses in flight at once (a single loop that walks each id's probe run in turn was slower
    out of cache: its branches on the loaded slot stall it); then the ids not settled at home
    walk their runs; then the records."""
    mask = (1 << bits) - 1
    # An id's home slot: the top ``bits`` bits of ``id * multiplier`` (wrapping, unsigned).
    shift, multiplier = np.uint64(64 - bits), np.uint64(_UNSIGNED_MULTIPLIER)
    n = ids.size
    flat = slots.reshape(-1)
    for i in range(n):
        if i + _PREFETCH_IDS < n:
            ahead = int(np.int64((np.uint64(ids[i + _PREFETCH_IDS]) * multiplier) >> shift))
            prefetch_read(flat, 2 * ahead)
        slot = np.int64((np.uint64(ids[i]) * multiplier) >> shift)
        out[i] = slots[slot, 1]
        hit_rows[i] = slots[slot, 0]
    for i in range(n):
        raw = ids[i]
        row = out[i]
        if row >= 0 and hit_rows[i] == raw:
            continue
        # Not at home: absent if home is empty, else up to ``reach`` slots further on (never
        # past an empty slot).
        found = EMPTY
        if row != EMPTY:
            slot = np.int64((np.uint64(raw) * multiplier) >> shift)
            for _ in range(reach):
                slot = (slot + 1) & mask
                held = slots[slot, 1]
                if held == EMPTY:
                    break
                if held >= 0 and slots[slot, 0] == raw:
                    found = held
                    break
        out[i] = found
    if record == 0:
        return 0, 0
    hits = 0
    misses = 0
    for i in range(n):
        row = out[i]
        if row >= 0:
            hit_rows[hits] = row
            hits += 1
        else:
            miss_at[misses] = i
            misses += 1
    for k in range(hits):
        last_read[hit_rows[k]] = step
    if record == 2:
        for k in range(hits):
            reads[hit_rows[k]] += 1
    return hits, misses


def _insert(
    slots: Int64s,
    row_slots: Int64s,
    bits: int,
    ids: Int64s,
    rows: Int64s,
    farthest: int,
    claims: Int64s,
) -> tuple[int, int]:
    """Add ``ids[i] -> rows[i]`` (distinct, absent ids; free rows) in the rounds of the torch
    insert: each pending id claims the first open slot of its window of ``INSERT_WINDOW``
    slots (the table as it was before the round), the first claimant in id order wins, the
    others walk on from after the slot they claimed (or after their window). ``claims``: any
    int64 array of one entry per slot (overwritten where read). Returns (farthest
    displacement, tombstones reused)."""
    mask = (1 << bits) - 1
    # An id's home slot: the top ``bits`` bits of ``id * multiplier`` (wrapping, unsigned).
    shift, multiplier = np.uint64(64 - bits), np.uint64(_UNSIGNED_MULTIPLIER)
    n = ids.size
    home = np.empty(n, dtype=np.int64)
    for i in range(n):
        home[i] = np.int64((np.uint64(ids[i]) * multiplier) >> shift)
    offset = np.zeros(n, dtype=np.int64)
    pending = np.arange(n)
    claimed = np.empty(n, dtype=np.int64)  # per pending id: its window position, -1 none
    left = n
    reused = 0
    while left > 0:
        for k in range(left):
            i = pending[k]
            start = home[i] + offset[i]
            claimed[k] = EMPTY
            for step in range(INSERT_WINDOW):
                if slots[(start + step) & mask, 1] < 0:
                    claimed[k] = step
                    break
        # The first claimant of each slot, in pending order.
        for k in range(left):
            if claimed[k] >= 0:
                claims[(home[pending[k]] + offset[pending[k]] + claimed[k]) & mask] = EMPTY
        for k in range(left):
            if claimed[k] >= 0:
                slot = (home[pending[k]] + offset[pending[k]] + claimed[k]) & mask
                if claims[slot] == EMPTY:
                    claims[slot] = k
        kept = 0
        for k in range(left):
            i = pending[k]
            if claimed[k] >= 0:
                slot = (home[i] + offset[i] + claimed[k]) & mask
                if claims[slot] == k:
                    if slots[slot, 1] == DELETED:
                        reused += 1
                    slots[slot, 0] = ids[i]
                    slots[slot, 1] = rows[i]
                    row_slots[rows[i]] = slot
                    farthest = max(farthest, (slot - home[i]) & mask)
                    continue
                offset[i] += claimed[k] + 1
            else:
                offset[i] += INSERT_WINDOW
            pending[kept] = i
            kept += 1
        left = kept
    return farthest, reused


def _rebuild(
    slots: Int64s, row_slots: Int64s, bits: int, wrapped_ids: Int64s, wrapped_rows: Int64s
) -> tuple[int, int]:
    """Re-place every held id into clean slots (the torch code's rebuild, same layout): ids in
    order of (home slot, row), each at ``max(home, previous slot + 1)``; those pushed past the
    last slot are written to ``wrapped_ids`` / ``wrapped_rows`` (in that order) for the caller
    to insert. Slots other than the placed ones become empty (their stale ids stay, as in the
    torch code). Returns (farthest displacement of the placed ids, ids wrapped).

    Rows are read in row order and counted by home slot (a counting sort, stable): the
    (home, row) order with no comparison sort.
    """
    num_slots = 1 << bits
    shift, multiplier = np.uint64(64 - bits), np.uint64(_UNSIGNED_MULTIPLIER)
    per_home = np.zeros(num_slots + 1, dtype=np.int64)
    held = 0
    for row in range(row_slots.size):
        slot = row_slots[row]
        if slot >= 0:
            raw = slots[slot, 0]
            per_home[np.int64((np.uint64(raw) * multiplier) >> shift) + 1] += 1
            held += 1
    for slot in range(num_slots):
        per_home[slot + 1] += per_home[slot]
    order_ids = np.empty(held, dtype=np.int64)
    order_rows = np.empty(held, dtype=np.int64)
    for row in range(row_slots.size):
        slot = row_slots[row]
        if slot >= 0:
            raw = slots[slot, 0]
            home = np.int64((np.uint64(raw) * multiplier) >> shift)
            at = per_home[home]
            per_home[home] = at + 1
            order_ids[at] = raw
            order_rows[at] = row
    for slot in range(num_slots):
        slots[slot, 1] = EMPTY
    farthest = 0
    wrapped = 0
    previous = -1
    for k in range(held):
        raw = order_ids[k]
        row = order_rows[k]
        start = int(np.int64((np.uint64(raw) * multiplier) >> shift))
        place = start if start > previous else previous + 1
        previous = place
        if place < num_slots:
            slots[place, 0] = raw
            slots[place, 1] = row
            row_slots[row] = place
            farthest = max(farthest, place - start)
        else:
            wrapped_ids[wrapped] = raw
            wrapped_rows[wrapped] = row
            wrapped += 1
    return farthest, wrapped


def _lowest(score: Int64s, limit: int, exclude: Int64s, need: int, out: Int64s) -> int:
    """The ``need`` rows of lowest (score, row) among those scoring below ``limit`` and not in
    ``exclude`` (fewer if fewer are), written to ``out`` in row order; returns how many.

    One pass finds the eligible scores' range; the ``need``-th lowest score (the threshold) comes
    from a histogram of the scores when their range is at most the row count (LRU's steps, LFU's
    read counts, as a rule), else from a partial sort of them; a last pass takes, in row order,
    every row below the threshold and the first rows at it.
    """
    n = score.size
    if need <= 0:
        return 0
    excluded = np.zeros(n, dtype=np.uint8)
    for k in range(exclude.size):
        excluded[exclude[k]] = 1
    low = limit
    high = -1
    eligible = 0
    for r in range(n):
        value = score[r]
        if value < limit and excluded[r] == 0:
            eligible += 1
            low = min(low, value)
            high = max(high, value)
    if eligible <= need:
        taken = 0
        for r in range(n):
            if score[r] < limit and excluded[r] == 0:
                out[taken] = r
                taken += 1
        return taken
    if high - low < n:
        counts = np.zeros(high - low + 1, dtype=np.int64)
        for r in range(n):
            value = score[r]
            if value < limit and excluded[r] == 0:
                counts[value - low] += 1
        below = 0
        at = 0
        while below + counts[at] < need:
            below += counts[at]
            at += 1
        threshold = low + at
    else:
        values = np.empty(eligible, dtype=np.int64)
        m = 0
        for r in range(n):
            value = score[r]
            if value < limit and excluded[r] == 0:
                values[m] = value
                m += 1
        threshold = np.partition(values, need - 1)[need - 1]
        below = 0
        for m in range(eligible):
            if values[m] < threshold:
                below += 1
    ties = need - below
    taken = 0
    for r in range(n):
        value = score[r]
        if value <= threshold and excluded[r] == 0:
            if value < threshold:
                out[taken] = r
                taken += 1
            elif ties > 0:
                out[taken] = r
                taken += 1
                ties -= 1
    return taken


FindKernel = Callable[
    [Int64s, int, int, Int64s, Int64s, Int64s, Int64s, Int64s, int, Int64s, int], tuple[int, int]
]
InsertKernel = Callable[[Int64s, Int64s, int, Int64s, Int64s, int, Int64s], tuple[int, int]]
LowestKernel = Callable[[Int64s, int, Int64s, int, Int64s], int]
RebuildKernel = Callable[[Int64s, Int64s, int, Int64s, Int64s], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class HostKernels:
    """The compiled kernels (arguments as the functions of the same name in this module)."""

    find: FindKernel
    insert: InsertKernel
    lowest: LowestKernel
    rebuild: RebuildKernel


@functools.cache
def host_kernels() -> HostKernels | None:
    """The kernels, compiled on the first call of the process; None without numba."""
    try:
        import numba
    except ImportError:
        return None
    register_intrinsics()
    jit = functools.partial(numba.njit, cache=True, nogil=True)
    return HostKernels(
        find=cast(FindKernel, jit(_find)),
        insert=cast(InsertKernel, jit(_insert)),
        lowest=cast(LowestKernel, jit(_lowest)),
        rebuild=cast(RebuildKernel, jit(_rebuild)),
    )
