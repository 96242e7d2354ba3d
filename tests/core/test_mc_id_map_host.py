"""IdRowMap's compiled CPU code (``host_loops=True``, the default) against its torch code (what
other devices run): the same rows found and the same slots, rows, tombstones and displacement
bound after every insert and removal, through races for one slot, long runs, wrap-around past
the last slot, tombstone reuse and rebuilds; and a managed module's training steps, whose read
records the compiled lookup writes, equal to the same steps on the torch code."""

from __future__ import annotations

import random

import pytest
import torch

from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_id_map import IdRowMap, hash_slots
from shardrec.modules.mc_id_map_host import host_kernels
from shardrec.modules.mc_policies import LFU_EvictionPolicy, LRU_EvictionPolicy

_MASK64 = 2**64 - 1
# The inverse of the map's multiplier modulo 2^64: id = (wanted product) * inverse.
_INVERSE = pow(-7046029254386353131 & _MASK64, -1, 2**64)


def _homed_at(slot: int, count: int, bits: int, rng: random.Random) -> list[int]:
    """``count`` distinct int64 ids whose home slot is ``slot``."""
    out = []
    for low in rng.sample(range(1 << 40), count):
        product = (slot << (64 - bits)) | low
        raw = (product * _INVERSE) & _MASK64
        out.append(raw - 2**64 if raw >= 2**63 else raw)
    return out


def _same_state(host: IdRowMap, plain: IdRowMap) -> None:
    for name in ("slots", "row_slots", "tombstones", "max_displacement"):
        assert torch.equal(getattr(host, name), getattr(plain, name)), name


@pytest.mark.parametrize(
    ("rows", "universe", "per_step", "crowd"),
    [
        (64, 2_000, 40, False),  # small table, heavy churn: rebuilds, long probe runs
        (8, 100_000, 8, True),  # ids homed on the last slots: runs wrap past the end
        (3_000, 2**62, 2_500, False),  # many ids per insert: several race for one slot
        (500, 2**62, 400, True),  # crowded homes: windows with no open slot, walks past them
    ],
)
def test_host_and_torch_code_give_the_same_map(
    rows: int, universe: int, per_step: int, crowd: bool
) -> None:
    rng = random.Random(rows)
    host, plain = IdRowMap(rows), IdRowMap(rows, host_loops=False)
    assert host.host_loops
    assert not plain.host_loops
    pool = list(range(universe)) if universe <= 100_000 else None
    if crowd and pool is not None:
        # Ids whose home slot is one of the last two: every run reaches the end of the table.
        near_end = hash_slots(torch.tensor(pool), host.bits) >= host.num_slots - 2
        pool = torch.tensor(pool)[near_end].tolist()
    held: dict[int, int] = {}
    free = list(range(rows))
    for step in range(30):
        drop = rng.sample(sorted(held.values()), len(held) // 3)
        gone = torch.tensor(sorted(drop), dtype=torch.int64)
        host.remove_rows(gone)
        plain.remove_rows(gone)
        dropped = set(drop)
        held = {i: r for i, r in held.items() if r not in dropped}
        free += drop
        if pool is not None:
            draw = rng.sample(pool, min(per_step, len(pool)))
        elif crowd:
            # Ids sharing a few home slots, some of them the last ones.
            crowded = [rng.randrange(host.num_slots) for _ in range(6)] + [host.num_slots - 1] * 2
            draw = [i for h in crowded for i in _homed_at(h, per_step // 8, host.bits, rng)]
        else:
            draw = [rng.randrange(-(2**63), 2**63) for _ in range(per_step)]
        new = [i for i in dict.fromkeys(draw) if i not in held][: len(free)]
        given = [free.pop(rng.randrange(len(free))) for _ in new]
        new_t, rows_t = torch.tensor(new, dtype=torch.int64), torch.tensor(given)
        host.insert(new_t, rows_t)
        plain.insert(new_t, rows_t)
        held.update(zip(new, given, strict=True))
        _same_state(host, plain)
        probe = torch.tensor(draw + list(held)[:200] + [rng.randrange(-(2**63), 2**63)])
        expected = [held.get(i, -1) for i in probe.tolist()]
        assert host.find(probe).tolist() == expected, step
        assert plain.find(probe).tolist() == expected, step
    assert int(host.max_displacement) > 0


def test_homed_at_gives_ids_of_that_home() -> None:
    got = torch.tensor(_homed_at(77, 5, 10, random.Random(1)))
    assert hash_slots(got, 10).tolist() == [77] * 5


def test_the_host_code_reads_and_writes_the_buffers_in_place() -> None:
    # The state dict holds what the host code wrote: a map loaded from it finds the same rows.
    host = IdRowMap(100)
    ids = torch.tensor([5, -7, 2**62, 123456789])
    host.insert(ids, torch.tensor([3, 0, 99, 42]))
    copy = IdRowMap(100, host_loops=False)
    copy.load_state_dict(host.state_dict())
    assert copy.find(ids).tolist() == [3, 0, 99, 42]
    assert host.find(torch.tensor([6, 5])).tolist() == [-1, 3]


def test_the_compiled_kernels_load() -> None:
    # numba is a dependency of shardrec: without it every test here would compare the torch
    # code with itself.
    assert host_kernels() is not None


@pytest.mark.parametrize("policy", [LRU_EvictionPolicy(), LFU_EvictionPolicy()])
def test_training_steps_on_the_compiled_lookup_equal_the_torch_code(policy: object) -> None:
    # LFU counts reads (the lookup adds them), LRU only stamps the step; a small table with
    # new ids every step evicts at every run, so stale records would pick other victims.
    def module() -> MCHManagedCollisionModule:
        return MCHManagedCollisionModule(40, eviction_policy=policy, eviction_interval=2)

    host, plain = module(), module()
    plain._map.host_loops = False
    rng = torch.Generator().manual_seed(3)
    for step in range(25):
        ids = torch.randint(-60, 60, (50,), generator=rng) * 2**40
        assert torch.equal(host(ids), plain(ids)), step
        rows_h, rows_p = host.evict(), plain.evict()
        assert (rows_h is None) == (rows_p is None), step
        if rows_h is not None and rows_p is not None:
            assert torch.equal(rows_h, rows_p), step
        for (name, a), (_, b) in zip(
            host.state_dict().items(), plain.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), (step, name)
    assert host.stats().evicted_total > 0


@pytest.mark.parametrize("spread", [30, 10**12])  # a histogram of the scores; a partial sort
def test_the_compiled_victim_choice_takes_the_lowest_keys(spread: int) -> None:
    kernels = host_kernels()
    assert kernels is not None
    rng = random.Random(spread)
    rows, limit = 500, 2**50
    for need in (1, 7, 120, 499, 600):
        score = [rng.randrange(spread) for _ in range(rows)]
        for r in rng.sample(range(rows), 60):
            score[r] = limit + rng.randrange(5)  # free rows: never taken
        exclude = [rng.randrange(rows) for _ in range(80)]  # repeats, as a batch's reads have
        eligible = sorted(
            (s, r) for r, s in enumerate(score) if s < limit and r not in set(exclude)
        )
        expected = sorted(r for _, r in eligible[:need])
        out = torch.empty(need, dtype=torch.int64)
        taken = kernels.lowest(
            torch.tensor(score).numpy(), limit, torch.tensor(exclude).numpy(), need, out.numpy()
        )
        assert out[:taken].tolist() == expected, need
