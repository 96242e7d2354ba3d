""":class:`~shardrec.modules.mc_id_map.IdRowMap`'s lookup and insert on CPU, in numpy.

The same algorithms as the map's torch code, step for step (the same slots, rows and
displacement bound come out; the tests run both on the same streams), on numpy views of the
map's buffers: no copies, the buffers stay the state. On CPU these calls are small (a table's
batch is a few thousand ids) and a torch call's fixed cost, a few microseconds on a loaded
machine plus slow reductions along short rows, was most of their time: measured 2-4x less
time per lookup and per insert here. The CPU-only shortcuts (a window's first match found with
``nonzero`` instead of a reduction per row) give the same answers.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["find_rows", "insert_rows"]

Int64s = npt.NDArray[np.int64]

_EMPTY: Final = -1
_DELETED: Final = -2
_SHORT_WINDOW: Final = 4
_LOOKUP_WINDOW: Final = 64
_INSERT_WINDOW: Final = 16


def hash_slots_np(ids: Int64s, bits: int, multiplier: int) -> Int64s:
    """:func:`~shardrec.modules.mc_id_map.hash_slots` on a numpy array: the same bits, computed
    unsigned (wrapping multiply, then a logical shift: no mask needed)."""
    mixed = ids.view(np.uint64) * np.uint64(multiplier & 0xFFFF_FFFF_FFFF_FFFF)
    mixed >>= np.uint64(64 - bits)
    out: Int64s = mixed.view(np.int64)
    return out


def find_rows(slots: Int64s, bits: int, reach: int, ids: Int64s, multiplier: int) -> Int64s:
    """The row of each id, -1 where absent (``slots``: the map's ``[S, 2]`` table)."""
    mask = (1 << bits) - 1
    pos = hash_slots_np(ids, bits, multiplier)
    # One gather of (id, row) pairs: numpy's ``take`` of whole rows copies 16 bytes per id.
    home = slots.take(pos, axis=0)
    rows = home[:, 1]
    hit = (home[:, 0] == ids) & (rows >= 0)
    found: Int64s = np.where(hit, rows, _EMPTY)
    if reach == 0:
        return found
    # Not at home, and home not empty: the id may sit up to ``reach`` slots further on.
    active = ((rows != _EMPTY) > hit).nonzero()[0]
    act_ids = ids[active]
    pos = pos[active]
    first = 1
    while active.size > 0:
        width = min(_SHORT_WINDOW if first == 1 else _LOOKUP_WINDOW, reach + 1 - first)
        flat = (pos[:, None] + np.arange(first, first + width)) & mask
        window = slots.take(flat.reshape(-1), axis=0)
        w_rows = window[:, 1]
        match = (window[:, 0] == np.repeat(act_ids, width)) & (w_rows >= 0)
        # At most one slot of an id's window holds it: its flat index names the id.
        at = match.nonzero()[0]
        found[active[at // width]] = w_rows[at]
        first += width
        if first > reach:
            break
        # Settled: found, or an empty slot in the window (an id never sits past one).
        settled = np.zeros(active.size, dtype=bool)
        settled[at // width] = True
        settled[(w_rows == _EMPTY).nonzero()[0] // width] = True
        go_on = (~settled).nonzero()[0]
        active, act_ids, pos = active[go_on], act_ids[go_on], pos[go_on]
    return found


def insert_rows(
    slots: Int64s,
    row_slots: Int64s,
    bits: int,
    ids: Int64s,
    rows: Int64s,
    farthest: int,
    multiplier: int,
    scratch: Int64s,
) -> tuple[int, int]:
    """Add ``ids[i] -> rows[i]`` (distinct, absent ids; free rows) in place, in the rounds of
    the torch insert: each pending id claims the first open slot of its window, the first
    claimant in id order wins, the others walk on. ``scratch``: any int64 array of one entry
    per slot (its contents are overwritten where read). Returns (farthest displacement,
    tombstones reused)."""
    mask = (1 << bits) - 1
    home = hash_slots_np(ids, bits, multiplier)
    steps = np.arange(1, _INSERT_WINDOW)
    pending = np.arange(ids.size)
    start = home.copy()
    offset = np.zeros(ids.size, dtype=np.int64)
    reused = 0
    slot_rows = slots[:, 1]
    while pending.size > 0:
        # The first open slot of each id's window: most ids find their start slot open, so
        # only the others read the rest of their window.
        start &= mask
        first = np.zeros(pending.size, dtype=np.int64)
        has_open = slot_rows[start] < 0
        walk = (~has_open).nonzero()[0]
        if walk.size > 0:
            window = (start[walk, None] + steps) & mask
            is_open = slot_rows[window] < 0
            step = is_open.argmax(axis=1)
            first[walk] = step + 1
            has_open[walk] = is_open[np.arange(walk.size), step]
        cand = has_open.nonzero()[0]
        cand_pos = (start[cand] + first[cand]) & mask
        # The first claimant of each slot in pending order: the smallest index written to the
        # slot (a scatter-min into scratch; measured several times cheaper than a stable sort).
        claimant = np.arange(cand.size)
        scratch[cand_pos] = cand.size
        np.minimum.at(scratch, cand_pos, claimant)
        at = (scratch[cand_pos] == claimant).nonzero()[0]
        winners = cand[at]
        won = cand_pos[at]
        reused += int(np.count_nonzero(slot_rows[won] == _DELETED))
        who = pending[winners]
        won_rows = rows[who]
        slots[won, 0] = ids[who]
        slots[won, 1] = won_rows
        row_slots[won_rows] = won
        if won.size > 0:
            farthest = max(farthest, int(((won - home[who]) & mask).max()))
        if winners.size == pending.size:
            break
        walked = np.where(has_open, first + 1, _INSERT_WINDOW)
        lost = np.ones(pending.size, dtype=bool)
        lost[winners] = False
        pending = pending[lost]
        offset = (offset + walked)[lost]
        start = home[pending] + offset
    return farthest, reused
